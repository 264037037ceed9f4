"""Fixtures (see conftest.py)."""

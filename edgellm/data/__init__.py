"""Embedded data: the default demo corpus (generated, no download)."""

from edgellm.data.corpus import generate_corpus

__all__ = ["generate_corpus"]

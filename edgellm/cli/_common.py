"""Helpers shared by CLI modules (see :mod:`edgellm._click`)."""

from edgellm._click import FriendlyGroup, echo_json, format_option, setup_logging

__all__ = ["FriendlyGroup", "echo_json", "format_option", "setup_logging"]

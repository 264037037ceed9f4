"""Helpers shared by CLI modules: output formats and JSON printing."""

from __future__ import annotations

import json
from typing import Any

import click

format_option = click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
    help="Output for people (table) or machines (json).",
)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))

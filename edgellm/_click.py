"""Pieces the three commands (`edgellm`, `edgellm-agent`, `edgellm-server`) share.

Kept outside :mod:`edgellm.cli` so the agent and the server can use them without loading the
`edgellm` command's groups.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from edgellm.errors import EdgeLLMError


class FriendlyGroup(click.Group):
    """Turns an :class:`EdgeLLMError` into a one-paragraph message with its hint (exit 1), no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeLLMError as e:
            raise click.ClickException(e.describe()) from e


format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output for people (table) or machines (json).",
)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def setup_logging(verbose: int) -> None:
    """The one place a command configures logging (libraries only log)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def add_examples(group: click.Group, examples: dict[str, str]) -> None:
    """Give each command named in `examples` ("build", "profiles list") an "Example:" section in `--help`.

    Each value is one or more command lines; the `\\b` marker keeps click from rewrapping them.
    An unknown name raises, so the table cannot drift from the commands it describes.
    """
    for path, text in examples.items():
        cmd: click.Command = group
        for name in path.split():
            sub = cmd.commands.get(name) if isinstance(cmd, click.Group) else None
            if sub is None:
                raise KeyError(f"no command {path!r} under {group.name!r}: fix the examples table")
            cmd = sub
        lines = "\n".join("  " + line for line in text.strip().splitlines())
        cmd.epilog = f"Example:\n\n\b\n{lines}"

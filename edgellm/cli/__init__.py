"""The ``edgellm`` command. One module per command group; heavy imports happen inside commands."""

from __future__ import annotations

import logging
import sys

import click

from edgellm import __version__
from edgellm.errors import EdgeLLMError


class _Group(click.Group):
    """Turns EdgeLLMError into a friendly one-paragraph error with a hint (no traceback)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except EdgeLLMError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="edgellm")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """edgellm: build, sign and ship quantized language models to device fleets."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _register() -> None:
    from edgellm.cli import bundle, build, keys, profiles, repo, train

    for mod in (profiles, bundle, keys, repo, train, build):
        for cmd in mod.commands:
            main.add_command(cmd)


_register()

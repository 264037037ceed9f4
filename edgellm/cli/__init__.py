"""The ``edgellm`` command. One module per command group; heavy imports happen inside commands."""

from __future__ import annotations

import click

from edgellm import __version__
from edgellm._click import FriendlyGroup, setup_logging


@click.group(cls=FriendlyGroup)
@click.version_option(__version__, prog_name="edgellm")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """edgellm: build, sign and ship quantized language models to device fleets."""
    setup_logging(verbose)


def _register() -> None:
    from edgellm.cli import build, bundle, finetune, keys, profiles, repo, train

    for mod in (profiles, bundle, keys, repo, train, finetune, build):
        for cmd in mod.commands:
            main.add_command(cmd)


_register()

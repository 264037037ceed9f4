"""The ``edgellm`` command. One module per command group; heavy imports happen inside commands."""

from __future__ import annotations

import click

from edgellm import __version__
from edgellm._click import FriendlyGroup, add_examples, setup_logging


@click.group(cls=FriendlyGroup)
@click.version_option(__version__, prog_name="edgellm")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """edgellm: build, sign and ship quantized language models to device fleets."""
    setup_logging(verbose)


PROGRAMS = ("edgellm", "edgellm-agent", "edgellm-server")


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.option(
    "--command",
    "prog",
    type=click.Choice(PROGRAMS),
    default="edgellm",
    show_default=True,
    help="Which of the three commands the script completes.",
)
def completion(shell: str, prog: str) -> None:
    """Print the shell completion script for SHELL (click's own completion).

    \b
    bash: edgellm completion bash >> ~/.bashrc   (or eval "$(edgellm completion bash)")
    zsh:  edgellm completion zsh >> ~/.zshrc
    fish: edgellm completion fish > ~/.config/fish/completions/edgellm.fish
    Repeat with --command edgellm-agent / edgellm-server for the other two commands.
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    if cls is None:  # click.Choice already restricts SHELL; kept for a click without one of them
        raise click.ClickException(f"click has no completion for {shell}: use bash, zsh or fish")
    # The script only calls `prog` back with this variable set; `prog` answers with its own commands.
    complete_var = "_{}_COMPLETE".format(prog.replace("-", "_").upper())
    click.echo(cls(main, {}, prog, complete_var).source())


def _register() -> None:
    from edgellm.cli import build, bundle, finetune, keys, profiles, quickstart, repo, train

    for mod in (profiles, bundle, keys, repo, train, finetune, build, quickstart):
        for cmd in mod.commands:
            main.add_command(cmd)
    main.add_command(completion)
    from edgellm.cli.examples import EXAMPLES

    add_examples(main, EXAMPLES)


_register()

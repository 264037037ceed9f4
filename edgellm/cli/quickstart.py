"""`edgellm quickstart` — the whole product on this machine, from text to a fine-tuned fleet."""

from __future__ import annotations

import sys
from pathlib import Path

import click


def _printers() -> tuple:
    """Plain lines in logs and pipes; rich on a terminal."""
    from edgellm.quickstart import STAGES, default_say, default_stage_started

    if not sys.stdout.isatty():
        return default_say, default_stage_started
    from rich.console import Console

    console = Console(highlight=False)

    def say(line: str) -> None:
        console.print(line, markup=False)

    def stage(i: int, name: str, what: str) -> None:
        console.rule(f"[bold][{i}/{len(STAGES)}] stage {name}[/]: {what}", align="left")

    return say, stage


@click.command("quickstart")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("edgellm-quickstart"),
    show_default=True,
    help="Where everything goes: models, bundles, server, broker, devices, logs.",
)
@click.option("--fresh", is_flag=True, help="Replace the work directory of an earlier quickstart run.")
@click.option("--keep-running", is_flag=True, help="Leave the fleet up at the end to explore (Ctrl-C stops it).")
@click.option("--steps", type=int, default=300, show_default=True, hidden=True, help="Teacher training steps.")
@click.option("--distill-steps", type=int, default=200, show_default=True, hidden=True)
@click.option("--fl-rounds", type=int, default=1, show_default=True, hidden=True)
@click.option("--fl-local-steps", type=int, default=12, show_default=True, hidden=True)
@click.option("--bake", default="30s", show_default=True, hidden=True, help="Canary bake time of each rollout.")
@click.option("--threads", type=int, default=2, show_default=True, hidden=True, help="Training threads.")
@click.option("--stop-after", default=None, hidden=True, help="Stop (cleanly) after this stage.")
def quickstart_cmd(
    workdir: Path,
    fresh: bool,
    keep_running: bool,
    steps: int,
    distill_steps: int,
    fl_rounds: int,
    fl_local_steps: int,
    bake: str,
    threads: int,
    stop_after: str | None,
) -> None:
    """Train, build, sign, serve, roll out and fine-tune on a local three-device fleet (about 7 minutes).

    Needs nothing downloaded; Mosquitto must be installed (it says how if not). Ends with a fleet
    table, each device's held-out perplexity before and after federated fine-tuning, the
    dashboard's address, and WORKDIR/summary.json. Ctrl-C stops every process it started.
    """
    from edgellm.quickstart import Interrupted, Options, run_quickstart

    say, stage = _printers()
    opts = Options(
        workdir=workdir,
        steps=steps,
        distill_steps=distill_steps,
        fl_rounds=fl_rounds,
        fl_local_steps=fl_local_steps,
        bake=bake,
        threads=threads,
    )
    try:
        result = run_quickstart(
            opts, say=say, stage_started=stage, stop_after=stop_after, keep_running=keep_running, fresh=fresh
        )
    except Interrupted as e:
        say(f"quickstart {e}; every process it started is stopped")
        raise SystemExit(130) from None
    if "dashboard" in result:
        say(f"dashboard: {result['dashboard']} (the fleet is stopped now; --keep-running leaves it up to explore)")
    say(f"summary: {opts.workdir / 'summary.json'} ({result['seconds']:.0f}s)")


commands: list = [quickstart_cmd]

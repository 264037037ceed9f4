"""`edgellm quickstart`: the whole product on one machine, with embedded defaults, nothing downloaded.

Train a teacher on the embedded corpus, distill a student, build bundles for three hardware
profiles, initialise a server and its repository, start a broker, provision and start three agents
(separate processes, their own profiles, data directories and local text), roll v1 out through a
canary gate under real traffic, ask one agent a question as firmware would, fine-tune on the
devices' text in a federated round (v2), roll v2 out, and end with the fleet table, each device's
held-out perplexity before and after, the dashboard's address and ``WORKDIR/summary.json``.

Every process it starts is stopped on success, failure, Ctrl-C or SIGTERM (see :mod:`.procs`),
unless ``keep_running`` leaves the fleet up after a successful run (until Ctrl-C).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgellm._fs import atomic_write
from edgellm.errors import EdgeLLMError
from edgellm.quickstart.procs import Interrupted, ProcessRegistry, StepFailed
from edgellm.quickstart.stages import STAGES, Options, Run

__all__ = ["STAGES", "Interrupted", "Options", "QuickstartError", "StepFailed", "run_quickstart"]

#: a file that says a directory is a quickstart work directory (so --fresh may empty it)
STAMP = ".edgellm-quickstart"


class QuickstartError(EdgeLLMError):
    """A stage failed; every process the quickstart started has been stopped."""


def prepare_workdir(workdir: Path, fresh: bool) -> None:
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / STAMP).exists():
            raise QuickstartError(
                f"{workdir} is not empty and is not a quickstart work directory",
                hint="pass another --workdir (an empty or new directory)",
            )
        if not fresh:
            raise QuickstartError(
                f"{workdir} holds an earlier quickstart run", hint="pass --fresh to replace it, or another --workdir"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / STAMP).write_text("made by `edgellm quickstart`; `--fresh` may delete this directory\n")


def run_quickstart(
    opts: Options,
    *,
    say: Callable[[str], None],
    stage_started: Callable[[int, str, str], None],
    stop_after: str | None = None,
    keep_running: bool = False,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run the stages in order; returns the summary (also written to WORKDIR/summary.json)."""
    if stop_after is not None and stop_after not in STAGES:
        raise QuickstartError(f"unknown stage {stop_after!r}", hint=f"use one of {', '.join(STAGES)}")
    opts.workdir = opts.workdir.resolve()
    prepare_workdir(opts.workdir, fresh)
    procs = ProcessRegistry(opts.workdir / "logs")
    procs.install_signal_handlers()
    run = Run(opts=opts, procs=procs, say=say)
    result: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        for i, (name, (what, fn)) in enumerate(STAGES.items(), 1):
            stage_started(i, name, what)
            out = fn(run)
            if isinstance(out, dict):
                result = out
            if name == stop_after:
                break
        result = result or {"workdir": str(opts.workdir), "stopped_after": stop_after}
        result["seconds"] = round(time.monotonic() - t0, 1)
        atomic_write(opts.workdir / "summary.json", (json.dumps(result, indent=2, default=str) + "\n").encode())
        if keep_running and stop_after is None:
            say(
                f"the fleet keeps running: dashboard {run.server_url}/ (a token: edgellm-server token create "
                f"--data-dir {run.srv} ...); Ctrl-C stops every process"
            )
            while True:
                time.sleep(3600)
        return result
    except StepFailed as e:
        msg = str(e) + (f"\n(full log: {e.log})" if e.log else "")
        raise QuickstartError(msg, hint=e.hint or f"see the logs in {opts.workdir / 'logs'}") from None
    finally:
        say("stopping every process the quickstart started ...")
        procs.stop_all()


def default_say(line: str) -> None:
    print(line, flush=True)


def default_stage_started(i: int, name: str, what: str) -> None:
    print(f"==> [{i}/{len(STAGES)}] stage {name}: {what}", file=sys.stdout, flush=True)

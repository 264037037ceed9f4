"""Progress of long commands (train, distill, export, build), shown on stderr.

On a terminal: a rich progress bar. Anywhere else (CI logs, pipes, files): plain lines, one
when the step changes, when another tenth of the work is done, or every
:data:`LINE_EVERY_SECONDS`, and one at the end, so a log never sits silent for long.

    with progress_reporter("train", total=300) as p:
        for step in ...:
            p.update(step + 1, detail=f"loss {loss:.3f}")

:func:`step_callback` adapts a reporter to the ``progress(step, i, n)`` callbacks the build uses.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

#: longest silence between two plain progress lines
LINE_EVERY_SECONDS = 5.0


class Reporter:
    """Shows nothing (``enabled=False``); the base of the two visible kinds."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, max(int(total), 1)
        self.done = 0
        self.step = label
        self.detail = ""

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._finish()

    def update(self, done: int, total: int | None = None, *, step: str | None = None, detail: str = "") -> None:
        """``done`` of ``total`` units finished; ``step`` names the current stage; ``detail`` is
        shown after the count (loss, speed, ...)."""
        step_changed = step is not None and step != self.step
        if total is not None:
            self.total = max(int(total), 1)
        self.done, self.detail = int(done), detail
        if step is not None:
            self.step = step
        self._show(step_changed)

    def _show(self, step_changed: bool) -> None:
        pass

    def _finish(self) -> None:
        pass


class LineReporter(Reporter):
    """Plain lines for logs: ``[label] step: done/total (pct%) detail  elapsed``."""

    def __init__(self, label: str, total: int, stream: TextIO) -> None:
        super().__init__(label, total)
        self.stream = stream
        self.t0 = self.last_time = time.monotonic()
        self.last_tenth = -1
        self.shown: tuple[int, str] | None = None  # (done, step) of the last line written

    def line(self) -> str:
        step = f"{self.step}: " if self.step != self.label else ""
        pct = 100 * self.done // self.total
        detail = f"  {self.detail}" if self.detail else ""
        return f"[{self.label}] {step}{self.done}/{self.total} ({pct}%){detail}  {time.monotonic() - self.t0:.1f} s"

    def _show(self, step_changed: bool) -> None:
        now = time.monotonic()
        tenth = 10 * self.done // self.total
        if step_changed or tenth > self.last_tenth or now - self.last_time >= LINE_EVERY_SECONDS:
            self._emit(now)
            self.last_tenth = tenth

    def _emit(self, now: float) -> None:
        text = self.line()
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last_time, self.shown = now, (self.done, self.step)

    def _finish(self) -> None:
        if self.shown != (self.done, self.step):
            self._emit(time.monotonic())


class RichReporter(Reporter):
    """A rich progress bar for terminals."""

    def __init__(self, label: str, total: int, stream: TextIO) -> None:
        super().__init__(label, total)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=Console(file=stream),
            transient=False,
        )
        self._task = self._bar.add_task(label, total=self.total, detail="")

    def __enter__(self) -> Reporter:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def _show(self, step_changed: bool) -> None:
        self._bar.update(self._task, completed=self.done, total=self.total, description=self.step, detail=self.detail)


def progress_reporter(label: str, total: int, *, enabled: bool = True, stream: TextIO | None = None) -> Reporter:
    """A bar on a terminal, plain lines elsewhere, nothing when not ``enabled``."""
    if not enabled:
        return Reporter(label, total)
    out = stream if stream is not None else sys.stderr
    if out.isatty():
        return RichReporter(label, total, out)
    return LineReporter(label, total, out)


def step_callback(reporter: Reporter) -> Callable[[str, int, int], None]:
    """``progress(step, i, n)`` for :func:`edgellm.pipeline.fleet_build.run_build` and friends."""

    def progress(step: str, i: int, n: int, *_: Any) -> None:
        reporter.update(i, n, step=step)

    return progress

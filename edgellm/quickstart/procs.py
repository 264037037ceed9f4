"""Every process the quickstart starts, and the guarantee that none outlives it.

Each child runs in its own session (its own process group) with a marker variable in its
environment, which its own children (a SuperLink, SuperNodes, ClientApps) inherit. Stopping:
SIGTERM to each group (newest first, so agents stop before the server and the broker), a grace
period, SIGKILL to what is left; then a sweep of ``/proc`` for any process that still carries the
marker (a grandchild that left its group) — it is killed too.

The caller installs :meth:`ProcessRegistry.install_signal_handlers` (SIGINT and SIGTERM raise
:class:`Interrupted`), and calls :meth:`ProcessRegistry.stop_all` in a ``finally``; an ``atexit``
hook covers the remaining ways out.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

#: environment variable carried by every process the quickstart starts (and their children)
MARKER_ENV = "EDGELLM_QUICKSTART_RUN"


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: stop every process and exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class StepFailed(Exception):
    """A command the quickstart ran failed; ``log`` names the file with its output."""

    def __init__(self, message: str, *, log: Path | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.log = log
        self.hint = hint


def marked_pids(marker: str) -> list[int]:
    """PIDs (other than this one) whose environment carries ``MARKER_ENV=marker``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry.name))
    return found


class ProcessRegistry:
    """Starts processes with a shared marker and stops all of them, exactly once."""

    def __init__(self, logs: Path, env: dict[str, str] | None = None) -> None:
        self.marker = secrets.token_hex(8)
        self.logs = logs
        self.env = {**os.environ, **(env or {}), MARKER_ENV: self.marker}
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._files: list[IO[bytes]] = []
        self._stopped = False
        atexit.register(self.stop_all)

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            # a second signal while stopping is ignored: stop_all is already running
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise Interrupted(signum)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(
        self, name: str, cmd: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """Start ``cmd`` in its own session, output appended to ``logs/NAME.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path(name), "ab")
        self._files.append(log)
        proc = subprocess.Popen(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env={**self.env, **(env or {})},
            start_new_session=True,
        )
        self.procs.append((name, proc))
        return proc

    def run(self, name: str, cmd: Sequence[str], *, timeout: float = 1800, hint: str | None = None) -> str:
        """Run ``cmd`` to completion (stoppable like any other child); returns its stdout."""
        self.logs.mkdir(parents=True, exist_ok=True)
        out_path = self.logs / f"{name}.out"
        with open(out_path, "wb") as out, open(self.log_path(name), "ab") as err:
            proc = subprocess.Popen(
                list(cmd), stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True
            )
            self.procs.append((name, proc))
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.stop(proc, 5)
                raise StepFailed(
                    f"{name} took longer than {timeout:.0f}s", log=self.log_path(name), hint=hint
                ) from None
            # interrupted while waiting: the process stays registered, stop_all ends it
            self.procs.remove((name, proc))
        if rc != 0:
            tail = _tail(self.log_path(name))
            raise StepFailed(f"{name} failed (exit {rc}):\n{tail}", log=self.log_path(name), hint=hint)
        return out_path.read_text(errors="replace")

    def stop(self, proc: subprocess.Popen, grace: float = 20) -> None:
        _stop_group(proc, grace)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self, grace: float = 20) -> None:
        """SIGTERM every group (newest first), SIGKILL after ``grace``; then sweep marked leftovers."""
        if self._stopped:
            return
        self._stopped = True
        for _name, proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        for _ in range(3):
            left = marked_pids(self.marker)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.2)
        for f in self._files:
            f.close()
        self._files.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except OSError:
        pass  # the group is gone


def _stop_group(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)  # the leader may be gone while its children are not
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""

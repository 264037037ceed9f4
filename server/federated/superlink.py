"""Flower's SuperLink, started and supervised by ``edgellm-server run --fl HOST:PORT``.

Flower 1.42's SuperLink serves its Fleet API (SuperNodes connect here), Control API (``flwr run``)
and Runtime API (its own ServerApp processes) over one HTTP port, given by ``--host``/``--port``;
the legacy gRPC Fleet/Control servers stay off. It runs with ``--insecure`` (put TLS in front, or
use Flower's ``--ssl-*`` options, on an untrusted network) and with
``--disable-runtime-dependency-installation``: a run's ServerApp imports this server's installed
code instead of the SuperLink installing the app's dependencies (which would fetch a CUDA torch).

``FLWR_HOME`` is ``<data dir>/flwr``: the SuperLink's state database, its log, and the
``config.toml`` that points the ``flwr`` CLI at it (connection ``edgellm``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgellm._fs import atomic_write
from edgellm.errors import EdgeLLMError

logger = logging.getLogger(__name__)

CONNECTION = "edgellm"
APP_DIR = Path(__file__).parent / "app"


class SuperLinkError(EdgeLLMError):
    """The SuperLink could not be started or refused a request."""


def parse_address(text: str, option: str = "--fl") -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SuperLinkError(f"{option} {text!r} is not HOST:PORT", hint=f"write e.g. {option} 0.0.0.0:9092")
    return host.strip("[]"), int(port)


def _exe(name: str) -> str:
    """A console script of this Python environment (next to the interpreter), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise SuperLinkError(f"{name} is not installed", hint="install the server extra: pip install 'edgellm[server]'")
    return found


class SuperLink:
    """One ``flower-superlink`` child process, restarted if it dies (with backoff)."""

    def __init__(self, home: Path, address: str, *, max_restarts: int = 20) -> None:
        self.home = Path(home).resolve()  # flwr runs with cwd=home: a relative FLWR_HOME would not resolve
        self.host, self.port = parse_address(address)
        self.proc: subprocess.Popen[bytes] | None = None
        self.max_restarts = max_restarts
        self.restarts = 0
        self._next_start = 0.0
        self._ready = False
        self._next_probe = 0.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def client_address(self) -> str:
        """Where local clients (``flwr``) reach it: a wildcard bind is reached on loopback."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_GRPC")}
        env["FLWR_HOME"] = str(self.home)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def write_config(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        atomic_write(
            self.home / "config.toml",
            (
                f'[superlink]\ndefault = "{CONNECTION}"\n\n'
                f'[superlink.{CONNECTION}]\naddress = "{self.client_address}"\ninsecure = true\n'
            ).encode(),
        )

    def start(self) -> None:
        self.write_config()
        cmd = [
            _exe("flower-superlink"),
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--database",
            str(self.home / "superlink.db"),
        ]
        log = open(self.home / "superlink.log", "ab")
        try:
            self.proc = subprocess.Popen(
                cmd,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        self._ready = False
        logger.info("SuperLink started (pid %d): Fleet API at %s, FLWR_HOME %s", self.proc.pid, self.address, self.home)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self, probe_every_s: float = 2.0) -> bool:
        """Whether the SuperLink answers its Control API (it takes a moment after starting)."""
        if not self.alive():
            self._ready = False
            return False
        if self._ready or time.monotonic() < self._next_probe:
            return self._ready
        self._next_probe = time.monotonic() + probe_every_s
        try:
            self._flwr(["ls", CONNECTION], timeout=30.0)
        except SuperLinkError:
            return False
        self._ready = True
        return True

    def supervise(self) -> None:
        """Called periodically: restart a SuperLink that exited (backoff up to a minute)."""
        if self.proc is None or self.alive() or time.monotonic() < self._next_start:
            return
        if self.restarts >= self.max_restarts:
            return
        self.restarts += 1
        logger.warning(
            "SuperLink exited with %s; restarting (%d/%d), see %s",
            self.proc.returncode,
            self.restarts,
            self.max_restarts,
            self.home / "superlink.log",
        )
        self._next_start = time.monotonic() + min(60.0, 2.0**self.restarts)
        self.start()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # its lifespan stops the SuperExec it started
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    # -- the flwr CLI against this SuperLink

    def _flwr(self, args: list[str], timeout: float = 120.0) -> Any:
        try:
            p = subprocess.run(
                [_exe("flwr"), *args, "--format", "json"],
                env=self.env(),
                capture_output=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                cwd=self.home,
            )
        except subprocess.TimeoutExpired as e:
            raise SuperLinkError(
                f"flwr {args[0]} did not answer in {timeout:.0f}s",
                hint=f"is the SuperLink up? see {self.home / 'superlink.log'}",
            ) from e
        out = p.stdout.decode(errors="replace").strip()
        try:
            data = json.loads(out[out.index("{") :]) if "{" in out else {}
        except ValueError:
            data = {}
        if p.returncode != 0 or data.get("success") is False:
            err = p.stderr.decode(errors="replace").strip()
            why = (
                data.get("error-message")
                or " | ".join(x for x in (out[-600:], err[-600:]) if x)
                or f"exit {p.returncode}"
            )
            raise SuperLinkError(f"flwr {args[0]} failed: {why}", hint=f"see {self.home / 'superlink.log'}")
        return data

    def submit(self, run_config: dict[str, str], app_dir: Path = APP_DIR) -> str:
        """Start a run of the app on this SuperLink; returns Flower's run id."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        data = self._flwr(["run", str(app_dir), CONNECTION, "--run-config", overrides])
        run = data.get("run-id")
        if not run:
            raise SuperLinkError(f"flwr run gave no run id: {data}")
        return str(run)

    def run_status(self, flower_run: str) -> str | None:
        """Flower's status of a run (e.g. ``running``, ``finished:completed``), None if unknown."""
        data = self._flwr(["ls", CONNECTION, "--run-id", flower_run], timeout=60.0)
        for r in data.get("runs", []):
            if str(r.get("run-id")) == str(flower_run):
                return str(r.get("status"))
        return None

    def stop_run(self, flower_run: str) -> None:
        self._flwr(["stop", flower_run, CONNECTION], timeout=60.0)

"""Start, watch and stop this device's Flower SuperNode for one federated run.

    resp = handle_fl_invite({"run_id": "r1", "superlink": "10.0.0.5:9092",
                             "base_version": "1.0.0", "base_sha256": "..."}, ctx)   # {"accepted": ..., "reason": ...}
    handle_fl_stop({"run_id": "r1"}, ctx)

``ctx`` is the agent (see :class:`AgentContext`): its paths, its config and an ``event(kind,
**fields)`` callable that reaches telemetry; ``fl_state`` events report ``started``, ``stopped``
and ``failed`` (with a reason).

The SuperNode is ``flower-supernode --insecure --superlink HOST:PORT --node-config FILE
--host 127.0.0.1 --port FREE`` with ``FLWR_HOME`` inside the agent dir (Flower 1.42 replaced
``--clientappio-api-address`` by ``--host``/``--port``; the node config is a TOML file so no path
needs shell-style quoting). It runs in its own process group, so stopping it also stops the
ClientApp processes it started; a watcher thread reports when it exits and stops it after
``fl_timeout_s``. Its pid is recorded in ``federated/supernode.json``: if the agent itself dies,
the next invitation or agent start (:func:`reap_stale`) ends the orphaned group.

One SuperNode per agent data dir: the supervisors of this process are kept by data dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from agent._fs import atomic_write_json, read_json
from agent.config import AgentConfig, AgentPaths
from agent.federated import device as dev
from edgellm._fs import atomic_write
from edgellm.ids import valid_id

log = logging.getLogger(__name__)

_HOSTPORT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253}):([0-9]{1,5})$")
STOP_GRACE_S = 10.0
LOG_MAX_BYTES = 16 << 20


class AgentContext(Protocol):
    paths: AgentPaths
    config: AgentConfig

    def event(self, kind: str, **fields: Any) -> None: ...


@dataclasses.dataclass
class AgentHandle:
    """An :class:`AgentContext` made of parts (what the daemon passes)."""

    paths: AgentPaths
    config: AgentConfig
    emit: Callable[..., None]

    def event(self, kind: str, **fields: Any) -> None:
        self.emit(kind, **fields)


def fl_dir(paths: AgentPaths) -> Path:
    return paths.root / "federated"


def supernode_exe() -> str:
    """``flower-supernode`` of this Python environment (the agent's venv), else from PATH."""
    import importlib.util

    local = Path(sys.executable).with_name("flower-supernode")
    found = str(local) if local.exists() else shutil.which("flower-supernode")
    if not found or importlib.util.find_spec("torch") is None:
        raise dev.Decline(
            dev.PROFILE_CANNOT_TRAIN,
            "flower-supernode or torch is not installed",
            hint="install the agent with the federated extra: pip install 'edgellm[federated]'",
        )
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid TOML basic string


def _is_supernode(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"flower-supernode" in cmd


def reap_stale(paths: AgentPaths) -> bool:
    """End a SuperNode group left behind by an agent that died; True when one was stopped."""
    info_path = fl_dir(paths) / "supernode.json"
    try:
        info = read_json(info_path)
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    stopped = False
    if pid > 1 and _is_supernode(pid):
        log.warning("stopping an orphaned SuperNode (pid %d) of run %s", pid, info.get("run_id"))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
            stopped = True
    info_path.unlink(missing_ok=True)
    return stopped


class SuperNode:
    """One ``flower-supernode`` process group for one run."""

    def __init__(
        self,
        paths: AgentPaths,
        config: AgentConfig,
        *,
        run_id: str,
        superlink: str,
        on_state: Callable[..., None],
        timeout_s: float | None = None,
        exe: str | None = None,
    ) -> None:
        self.paths, self.config, self.run_id, self.superlink = paths, config, run_id, superlink
        self.on_state = on_state
        self.timeout_s = float(timeout_s if timeout_s is not None else config.fl_timeout_s)
        self.exe = exe or supernode_exe()
        self.proc: subprocess.Popen | None = None
        self.stop_reason: str | None = None
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, node_config_file: Path, port: int) -> list[str]:
        return [
            self.exe,
            "--insecure",
            "--superlink",
            self.superlink,
            "--node-config",
            str(node_config_file),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]

    def start(self) -> None:
        home = fl_dir(self.paths) / "flwr-home"
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        node_cfg = fl_dir(self.paths) / "node-config.toml"
        atomic_write(
            node_cfg,
            (
                f"device-id = {_toml_str(self.config.device_id)}\nagent-dir = {_toml_str(str(self.paths.root))}\n"
            ).encode(),
            mode=0o600,
        )
        # the SuperNode starts flower-superexec / flwr-clientapp from PATH: the ones beside it first
        path = os.pathsep.join([str(Path(self.exe).parent), os.environ.get("PATH", "")])
        env = {
            **os.environ,
            "PATH": path,
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE",
        }
        log_path = fl_dir(self.paths) / "supernode.log"
        if log_path.exists() and log_path.stat().st_size > LOG_MAX_BYTES:  # keep one previous log
            os.replace(log_path, log_path.with_suffix(".log.1"))
        log_file = open(log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.command(node_cfg, _free_port()),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log_file.close()
        atomic_write_json(
            fl_dir(self.paths) / "supernode.json",
            {"pid": self.proc.pid, "run_id": self.run_id, "superlink": self.superlink, "started_at": time.time()},
        )
        self._watcher = threading.Thread(target=self._watch, name=f"fl-supernode-{self.run_id}", daemon=True)
        self._watcher.start()
        self.on_state("started", run_id=self.run_id, pid=self.proc.pid)

    def _watch(self) -> None:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.stop("timeout")  # from this thread: reported below
            rc = self.proc.returncode
        with self._lock:
            reason = self.stop_reason
        (fl_dir(self.paths) / "supernode.json").unlink(missing_ok=True)
        if reason is not None:
            self.on_state("stopped", run_id=self.run_id, reason=reason)
        elif rc == 0:
            self.on_state("stopped", run_id=self.run_id, reason="run ended")
        else:
            self.on_state(
                "failed",
                run_id=self.run_id,
                reason=f"flower-supernode exited with code {rc}",
                hint=f"see {fl_dir(self.paths) / 'supernode.log'}",
            )

    def stop(self, reason: str = "stop requested", grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM to the whole group, SIGKILL after ``grace_s``; reported once by the watcher."""
        with self._lock:
            if self.proc is None or self.stop_reason is not None:
                return
            self.stop_reason = reason
        pid = self.proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # also any ClientApp left in the group
        self.proc.wait()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)


_NODES: dict[Path, SuperNode] = {}
_NODES_LOCK = threading.Lock()


def current(paths: AgentPaths) -> SuperNode | None:
    with _NODES_LOCK:
        node = _NODES.get(paths.root)
    return node if node is not None and node.running else None


def _parse_invite(payload: Any) -> tuple[str, str, str]:
    if not isinstance(payload, dict):
        raise dev.Decline(dev.BAD_REQUEST, "fl_invite payload must be an object")
    run_id, link, sha = payload.get("run_id"), payload.get("superlink"), payload.get("base_sha256")
    if not valid_id(run_id):
        raise dev.Decline(dev.BAD_REQUEST, "fl_invite: run_id is missing or not a valid id")
    m = _HOSTPORT_RE.match(link) if isinstance(link, str) else None
    if m is None or not 1 <= int(m.group(2)) <= 65535:
        raise dev.Decline(dev.BAD_REQUEST, "fl_invite: superlink must be HOST:PORT")
    if not dev.valid_sha256(sha):
        raise dev.Decline(dev.BAD_REQUEST, "fl_invite: base_sha256 must be 64 lowercase hex digits")
    return str(run_id), str(link), str(sha)


def handle_fl_invite(payload: dict, agent_ctx: AgentContext, *, exe: str | None = None) -> dict:
    """Accept (and start a SuperNode) or decline an invitation; never raises for a bad request."""
    paths, config = agent_ctx.paths, agent_ctx.config

    def on_state(state: str, **fields: Any) -> None:
        agent_ctx.event("fl_state", state=state, **fields)

    try:
        run_id, superlink, sha = _parse_invite(payload)
        with _NODES_LOCK:
            node = _NODES.get(paths.root)
            if node is not None and node.running:
                if node.run_id == run_id:
                    return {"accepted": True, "reason": "already running"}
                raise dev.Decline(dev.BUSY, f"this device already takes part in run {node.run_id}")
            reap_stale(paths)
            dev.check_can_train(paths, config, sha, deep=False)
            node = SuperNode(paths, config, run_id=run_id, superlink=superlink, on_state=on_state, exe=exe)
            node.start()
            _NODES[paths.root] = node
    except dev.Decline as e:
        log.info("fl_invite declined: %s", e)
        return {"accepted": False, "reason": e.reason, "detail": e.args[0]}
    except OSError as e:
        on_state("failed", run_id=str(payload.get("run_id")), reason=f"cannot start flower-supernode: {e}")
        return {"accepted": False, "reason": dev.FAILED, "detail": str(e)}
    return {"accepted": True, "reason": ""}


def handle_fl_stop(payload: dict, agent_ctx: AgentContext) -> dict:
    """Stop the SuperNode of ``payload['run_id']`` (no-op when another run, or none, is running)."""
    run_id = payload.get("run_id") if isinstance(payload, dict) else None
    if not valid_id(run_id):
        return {"stopped": False, "reason": dev.BAD_REQUEST}
    with _NODES_LOCK:
        node = _NODES.get(agent_ctx.paths.root)
    if node is None or node.run_id != run_id or not node.running:
        return {"stopped": False, "reason": "not running"}
    node.stop("fl_stop")
    return {"stopped": True, "reason": ""}


def stop_all(reason: str = "agent stopping") -> None:
    """Stop every SuperNode this process started (the daemon calls it on shutdown)."""
    with _NODES_LOCK:
        nodes = list(_NODES.values())
        _NODES.clear()
    for node in nodes:
        node.stop(reason)

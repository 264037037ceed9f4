"""`edgellm-agent run`: the long-lived daemon.

Threads: uvicorn's event loop (main thread; SIGTERM/SIGINT stop it cleanly), the engine worker
(owns the model), an update thread (interval + on demand) and a watcher that reconciles the
served model with the slot pointer every second — so an offline `install` or a `rollback` run
from the CLI is picked up and hot-swapped while requests keep being served — and commits the
trial of a new slot once it has served for ``trial_commit_s``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent._fs import atomic_write_json, remove_tree
from agent.config import AgentConfig, AgentPaths
from agent.engine import Engine, ModelHandle
from agent.errors import AgentError, InstallError
from agent.install import Installer
from agent.manifest import mget, read_manifest
from agent.slots import SlotStore
from agent.telemetry_bridge import make_telemetry

log = logging.getLogger(__name__)


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise AgentError(f"--listen {listen!r} is not HOST:PORT", hint="for example --listen 127.0.0.1:8321")
    host = host.strip("[]") or "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as e:
        raise AgentError(f"--listen host {host!r} is not an IP address", hint="use 127.0.0.1 or ::1") from e
    if not ip.is_loopback:
        raise AgentError(f"refusing to listen on {host}: the local API is for this device's own software",
                         hint="listen on 127.0.0.1 (or ::1), or use --socket for a Unix socket")
    return host, int(port)


def bind_tcp(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(128)
    s.setblocking(False)
    return s


def bind_unix(path: str | Path, mode: int = 0o660) -> socket.socket:
    path = Path(path)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of a dead agent
        else:
            raise AgentError(f"{path} is in use by a running process", hint="stop the other agent first")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, mode)
    s.listen(128)
    s.setblocking(False)
    return s


def load_handle(paths: AgentPaths, slot: str, *, threads: int) -> ModelHandle:
    from edgellm.runtime import load_runtime

    slot_dir = paths.slot_dir(slot)
    m = read_manifest(slot_dir)
    rt = load_runtime(mget(m, "runtime"), slot_dir / mget(m, "artifact"), model_dir=slot_dir, threads=threads,
                      context_length=mget(mget(m, "memory"), "context_length"))
    return ModelHandle(runtime=rt, name=str(mget(m, "name")), version=str(mget(m, "version")), slot=slot,
                       kind=str(mget(m, "runtime")), quantization=mget(m, "quantization"),
                       defaults=dict(mget(m, "generation") or {}))


def status_dict(paths: AgentPaths, config: AgentConfig | None = None) -> dict:
    """What `status` and GET /v1/admin/status report (works with or without a running daemon)."""
    state = SlotStore(paths).load()
    rec = state.current_record
    run: dict[str, Any] = {}
    if paths.run_info.exists():
        with contextlib.suppress(OSError, ValueError):
            import json

            run = json.loads(paths.run_info.read_text())
            pid = int(run.get("pid", 0))
            try:
                os.kill(pid, 0)
                run["running"] = True
            except OSError:
                run = {"running": False}
    health = "no_model"
    if rec is not None:
        health = "trial" if state.trial else ("ok" if rec.health.get("ok", True) else "degraded")
    return {
        "device_id": config.device_id if config else None,
        "profile": config.profile if config else None,
        "group": config.group if config else None,
        "slot": state.current,
        "model": rec.name if rec else None,
        "version": rec.version if rec else None,
        "runtime": rec.runtime if rec else None,
        "quantization": rec.quantization if rec else None,
        "health": health,
        "health_check": ({k: rec.health.get(k) for k in ("tokens_per_second", "memory_bytes", "load_s", "duration_s")}
                         if rec else None),
        "trial": state.trial.to_dict() if state.trial else None,
        "previous": ({"slot": state.previous, "version": state.slots[state.previous].version}
                     if state.previous else None),
        "last_update": state.last_result,
        "rejected": state.rejected,
        "daemon": run or {"running": False},
    }


class Daemon:
    def __init__(self, paths: AgentPaths, config: AgentConfig, *, listen: str | None = None,
                 socket_path: str | None = None, watch_interval_s: float = 1.0) -> None:
        self.paths = paths
        self.config = config
        self.listen = listen if listen is not None else config.listen
        self.socket_path = socket_path if socket_path is not None else config.socket
        self.watch_interval_s = watch_interval_s
        self.store = SlotStore(paths)
        self.telemetry = make_telemetry(config, paths)
        self.installer = Installer(paths, config, on_event=self._event)
        self._stop = threading.Event()
        self._update_now = threading.Event()
        self._desired: dict = {}
        self._loaded_key: tuple | None = None
        self._failed_key: tuple | None = None
        self._loaded_at = 0.0
        self._reconcile_lock = threading.Lock()
        self.metrics = None
        self.engine: Engine | None = None

    # -- events ---------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> None:
        log.info(kind, extra=fields)
        with contextlib.suppress(Exception):
            self.telemetry.event(kind, **fields)
        if self.metrics is not None and kind.startswith("update."):
            self.metrics.updates.labels(kind.split(".", 1)[1]).inc()

    def request_update(self, desired: dict | None = None) -> None:
        """Check for an update now, towards ``desired`` (API call or the server's desired state).

        ``desired`` replaces the previous one: ``{}`` means "the newest target for this profile"."""
        self._desired = {k: v for k, v in (desired or {}).items() if v is not None}
        self._update_now.set()

    # -- model reconciliation -------------------------------------------------------------------

    def reconcile(self) -> None:
        with self._reconcile_lock:
            self._reconcile()

    def _reconcile(self, depth: int = 0) -> None:
        assert self.engine is not None
        state = self.store.load()
        rec = state.current_record
        key = (state.current, rec.manifest_sha256) if rec else None
        if key != self._loaded_key and key != self._failed_key:
            if rec is None:
                self.engine.swap(None)
                self._loaded_key = None
                self._set_state(None, state)
                return
            try:
                self.store.verify(state, state.current, deep=False)
                handle = load_handle(self.paths, state.current, threads=self.config.threads)
            except Exception as e:  # noqa: BLE001
                log.error("could not load slot %s: %s", state.current, e)
                self._failed_key = key  # not retried every second; a new pointer is tried again
                if depth == 0 and state.previous:
                    with self.installer.lock():
                        self.store.rollback(reason=f"slot {state.current} failed to load: {e}", action="revert")
                    self._event("update.rolled_back", reason=f"load failed: {e}")
                    self._reconcile(depth + 1)
                return
            self.engine.swap(handle)
            self._loaded_key = key
            self._loaded_at = time.monotonic()
            if state.trial is not None and state.trial.boots == 0:
                with self.installer.lock():
                    self.store.count_boot(state.current)
            self._set_state(handle, state)
        if state.trial is not None and state.trial.slot == state.current and self._loaded_key == key \
                and time.monotonic() - self._loaded_at >= self.config.trial_commit_s:
            with self.installer.lock():
                self.store.commit_trial()
            self._event("update.committed", version=rec.version if rec else None, slot=state.current)
            self._set_state(self.engine.model, self.store.load())

    def _set_state(self, handle: ModelHandle | None, state: Any) -> None:
        with contextlib.suppress(Exception):
            self.telemetry.set_state(version=handle.version if handle else None,
                                     model=handle.name if handle else None, slot=state.current,
                                     health="trial" if state.trial else ("ok" if handle else "no_model"))

    # -- background threads ---------------------------------------------------------------------

    def _source(self):
        if not self.config.server:
            return None
        from agent.source import tuf_source

        return tuf_source(self.paths, self.config)

    def follows_latest(self) -> bool:
        """Periodic checks install the newest target only on devices no control plane steers."""
        v = self.config.extra.get("follow_latest")
        return bool(v) if v is not None else self.config.mqtt is None

    def check_updates(self, desired: dict | None = None, *, explicit: bool = True) -> dict | None:
        source = self._source()
        if source is None:
            return None
        desired = dict(self._desired if desired is None else desired)
        if not explicit and not desired and not self.follows_latest():
            log.debug("no desired state from the control plane yet: nothing to update")
            return None
        try:
            res = self.installer.update(source, desired)
        except InstallError as e:
            log.warning("update failed: %s", e)
            res = {"ok": False, "reason": str(e)}
        self.reconcile()
        return res

    def _update_loop(self) -> None:
        interval = self.config.update_interval_s
        next_at = time.monotonic() + min(interval, 30.0)
        while not self._stop.is_set():
            woke = self._update_now.wait(timeout=max(0.0, next_at - time.monotonic()))
            if self._stop.is_set():
                return
            self._update_now.clear()
            if woke or time.monotonic() >= next_at:
                try:
                    self.check_updates(explicit=woke)
                except Exception:  # noqa: BLE001
                    log.exception("update check crashed")
                next_at = time.monotonic() + interval

    def _watch_loop(self) -> None:
        while not self._stop.wait(self.watch_interval_s):
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001
                log.exception("reconcile failed")

    # -- main -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _sockets(self) -> Iterator[list[socket.socket]]:
        socks: list[socket.socket] = []
        try:
            if self.listen:
                socks.append(bind_tcp(*parse_listen(self.listen)))
            if self.socket_path:
                socks.append(bind_unix(self.socket_path))
            if not socks:
                raise AgentError("nothing to listen on", hint="pass --listen 127.0.0.1:PORT and/or --socket PATH")
            yield socks
        finally:
            for s in socks:
                s.close()
            if self.socket_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.socket_path)

    def run(self) -> int:
        import uvicorn

        from agent.api import AdminHooks, create_app
        from agent.audit import AuditLog
        from agent.metrics import Metrics
        from agent.provision import read_token

        self.paths.ensure_dirs()
        from agent.federated.learn import recorder as learn_recorder
        from agent.federated.supervisor import reap_stale

        reap_stale(self.paths)  # a SuperNode left by an agent that died
        with self.installer.lock():
            self.store.boot(max_boots=self.config.max_boot_attempts)
        self.metrics = Metrics()
        lim = self.config.limits
        self.engine = Engine(queue_size=lim.queue_size, max_prompt_tokens=lim.max_prompt_tokens,
                             metrics=self.metrics, on_inference=self._record_inference)
        self.engine.start()
        audit = AuditLog(self.paths.audit_log, include_prompts=self.config.audit_prompts)
        self.reconcile()
        app = create_app(engine=self.engine, token=read_token(self.paths), limits=lim, metrics=self.metrics,
                         audit=audit, hooks=AdminHooks(status=lambda: status_dict(self.paths, self.config),
                                                       request_update=self.request_update,
                                                       on_chat=learn_recorder(self.paths, self.config)))
        threads = [threading.Thread(target=self._update_loop, name="edgellm-updates", daemon=True),
                   threading.Thread(target=self._watch_loop, name="edgellm-watch", daemon=True)]
        try:
            self.telemetry.on_desired(self.request_update)
            if hasattr(self.telemetry, "on_command"):
                self.telemetry.on_command(self._command)
            self.telemetry.start()
        except Exception:  # noqa: BLE001 - telemetry never stops serving
            log.exception("telemetry did not start")
        try:
            with self._sockets() as socks:
                port = next((s.getsockname()[1] for s in socks if s.family != socket.AF_UNIX), None)
                atomic_write_json(self.paths.run_info, {"pid": os.getpid(), "port": port, "socket": self.socket_path,
                                                        "started_at": time.time()})
                for t in threads:
                    t.start()
                log.info("agent listening", extra={"port": port, "socket": self.socket_path,
                                                   "device_id": self.config.device_id})
                server = _Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", ws="none",
                                                timeout_graceful_shutdown=5, server_header=False,
                                                limit_concurrency=lim.max_connections, timeout_keep_alive=5))
                server.run(sockets=socks)
        finally:
            log.info("agent stopping")
            self._stop.set()
            self._update_now.set()
            for t in threads:
                if t.is_alive():
                    t.join(timeout=10)
            self.engine.stop()
            from agent.federated.supervisor import stop_all

            stop_all()
            with contextlib.suppress(Exception):
                self.telemetry.stop()
            audit.close()
            remove_tree(self.paths.run_info)
            log.info("agent stopped")
        return 0

    def _command(self, name: str, args: dict) -> Any:
        """Commands from the control plane (besides ping/state, which telemetry answers itself)."""
        if name == "update":
            self.request_update(args)
            return {"accepted": True}
        if name == "rollback":
            res = self.installer.rollback()
            self.reconcile()
            return res
        if name == "status":
            return status_dict(self.paths, self.config)
        if name in ("fl_invite", "fl_stop"):
            from agent.federated import supervisor as fl

            handler = fl.handle_fl_invite if name == "fl_invite" else fl.handle_fl_stop
            return handler(args, fl.AgentHandle(self.paths, self.config, self._event))
        raise ValueError(f"unknown command {name!r}: the agent knows update, rollback and status")

    def _record_inference(self, **kw: Any) -> None:
        self.telemetry.record_inference(**kw)


class _Server:
    """uvicorn's Server without re-raising the captured signal after a graceful stop."""

    def __new__(cls, config):  # noqa: ANN001
        import uvicorn

        class S(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # type: ignore[override]
                import signal

                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                sigs = (signal.SIGINT, signal.SIGTERM)
                old = {s: signal.signal(s, self.handle_exit) for s in sigs}
                try:
                    yield
                finally:
                    for s, h in old.items():
                        signal.signal(s, h)

        return S(config)

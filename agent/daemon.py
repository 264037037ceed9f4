"""`edgellm-agent run`: the long-lived daemon.

Threads: uvicorn's event loop (main thread; SIGTERM/SIGINT stop it cleanly), the engine worker
(owns the model), an update thread (interval + on demand) and a watcher that reconciles the
served model with the slot pointer every second — so an offline `install` or a `rollback` run
from the CLI is picked up and hot-swapped while requests keep being served — and commits the
trial of a new slot once it has served for ``trial_commit_s``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from agent._fs import atomic_write_json, remove_tree
from agent.config import AgentConfig, AgentPaths
from agent.engine import Engine, ModelHandle
from agent.errors import ConfigError, InstallError, message_of
from agent.install import Installer
from agent.listen import bind_tcp, bind_unix, parse_listen
from agent.lora_serving import adapter_status, served
from agent.manifest import read_manifest
from agent.schemas import UpdateRequest
from agent.slots import SlotStore
from agent.telemetry_bridge import TelemetryPort, make_telemetry, telemetry_problem

if TYPE_CHECKING:
    from agent.metrics import Metrics

log = logging.getLogger(__name__)


def load_handle(paths: AgentPaths, slot: str, *, threads: int | None = None) -> ModelHandle:
    """Load a slot's model with the manifest's runtime settings; ``threads`` (the config's) overrides
    the manifest's thread count, which is otherwise capped at the CPUs this process may use."""
    from edgellm.runtime import load_runtime
    from edgellm.runtime.settings import resolve

    slot_dir = paths.slot_dir(slot)
    m = read_manifest(slot_dir)
    rt = load_runtime(
        m.runtime,
        slot_dir / m.artifact,
        model_dir=slot_dir,
        settings=resolve(m, threads),
        context_length=m.memory.context_length or None,
    )
    return ModelHandle(
        runtime=rt,
        name=m.name,
        version=m.version,
        slot=slot,
        kind=m.runtime,
        quantization=m.quantization,
        defaults=dict(m.generation),
        adapters=served(paths, slot, rt, m),
    )


def status_dict(paths: AgentPaths, config: AgentConfig | None = None, telemetry: TelemetryPort | None = None) -> dict:
    """What `status` and GET /v1/admin/status report (works with or without a running daemon;
    without one, telemetry is what starting it would give: disabled, or the error it would hit)."""
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
        "health_check": (
            {k: rec.health.get(k) for k in ("tokens_per_second", "memory_bytes", "load_s", "duration_s")}
            if rec
            else None
        ),
        "trial": state.trial.to_dict() if state.trial else None,
        "previous": (
            {"slot": state.previous, "version": state.slots[state.previous].version} if state.previous else None
        ),
        "last_update": state.last_result,
        "rejected": state.rejected,
        "adapters": adapter_status(paths, state),
        "daemon": run or {"running": False},
        "telemetry": _telemetry_status(paths, config, telemetry),
    }


def _telemetry_status(paths: AgentPaths, config: AgentConfig | None, telemetry: TelemetryPort | None) -> dict:
    if telemetry is not None:
        return telemetry.status()
    if config is None or config.mqtt is None:
        return {"state": "disabled", "error": None}
    problem = telemetry_problem(config)
    if problem is not None:
        return {"state": "error", "error": problem}
    return {"state": "configured", "error": None, "broker": config.mqtt.url}


class Daemon:
    def __init__(
        self,
        paths: AgentPaths,
        config: AgentConfig,
        *,
        listen: str | None = None,
        socket_path: str | None = None,
        watch_interval_s: float = 1.0,
    ) -> None:
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
        self._desired = UpdateRequest()
        self._loaded_key: tuple | None = None
        self._failed_key: tuple | None = None
        self._loaded_at = 0.0
        self._reconcile_lock = threading.Lock()
        self.metrics: Metrics | None = None
        self.engine: Engine | None = None

    # -- events ---------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> None:
        if kind.startswith("update."):  # the server shows each device's rejected versions
            with contextlib.suppress(Exception):
                fields.setdefault("rejected", self.store.load().rejected[-20:])
        log.info(kind, extra=fields)
        with contextlib.suppress(Exception):
            self.telemetry.event(kind, **fields)
        if self.metrics is not None and kind.startswith("update."):
            self.metrics.updates.labels(kind.split(".", 1)[1]).inc()

    def request_update(self, request: UpdateRequest) -> None:
        """Check for an update now, towards ``request`` (admin API, MQTT command, desired state).

        It replaces the previous one: an empty request means "what the fleet assigned me"."""
        self._desired = request
        self._update_now.set()

    def _on_desired(self, desired: dict[str, Any]) -> None:
        """The control plane's desired state (retained MQTT message) is a nudge: check the signed
        assignment now. Its payload is never trusted for what to install."""
        log.info("desired state changed: checking the signed assignment", extra={"hint": desired.get("version")})
        self.request_update(UpdateRequest())

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
            if rec is None or state.current is None:
                self.engine.swap(None)
                self._loaded_key = None
                self._set_state(None, state)
                return
            try:
                self.store.verify(state, state.current, deep=False)
                handle = load_handle(self.paths, state.current, threads=self.config.threads)
            except Exception as e:  # noqa: BLE001 - a slot that will not load must not stop the daemon serving
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
                    self.store.count_boot(handle.slot or state.current)
            self._set_state(handle, state)
        if (
            state.trial is not None
            and state.trial.slot == state.current
            and self._loaded_key == key
            and time.monotonic() - self._loaded_at >= self.config.trial_commit_s
        ):
            with self.installer.lock():
                self.store.commit_trial()
            self._event("update.committed", version=rec.version if rec else None, slot=state.current)
            self._set_state(self.engine.model, self.store.load())

    def _set_state(self, handle: ModelHandle | None, state: Any) -> None:
        with contextlib.suppress(Exception):
            self.telemetry.set_state(
                version=handle.version if handle else None,
                model=handle.name if handle else None,
                slot=state.current,
                health="trial" if state.trial else ("ok" if handle else "no_model"),
            )

    # -- background threads ---------------------------------------------------------------------

    def _source(self):
        if not self.config.server:
            return None
        from agent.source import tuf_source

        return tuf_source(self.paths, self.config)

    def check_updates(self, request: UpdateRequest | None = None, *, explicit: bool = True) -> dict | None:
        """One update check: towards an explicit request (admin API, CLI), else towards this
        device's signed assignment (periodic poll, MQTT nudge). No assignment: nothing to do."""
        source = self._source()
        if source is None:
            return None
        desired = self._desired if request is None else request
        try:
            if desired == UpdateRequest():  # the signed assignment: its base, then its adapters
                from agent import assignment

                res = assignment.apply(
                    self.paths, self.config, source, self.installer, on_group=self.telemetry.set_group
                )
                if res is None:
                    log.info("no assignment for this device: nothing to update")
                    return None
            else:
                res = self.installer.update(source, desired)
        except InstallError as e:
            log.warning("update failed: %s", message_of(e))
            res = {"ok": False, "reason": message_of(e), "hint": e.hint}
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
                except Exception:
                    log.exception("update check crashed")
                next_at = time.monotonic() + interval

    def _watch_loop(self) -> None:
        while not self._stop.wait(self.watch_interval_s):
            try:
                self.reconcile()
            except Exception:
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
                raise ConfigError("nothing to listen on", hint="pass --listen 127.0.0.1:PORT and/or --socket PATH")
            yield socks
        finally:
            for s in socks:
                s.close()
            if self.socket_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.socket_path)

    def run(self) -> int:
        from agent.api.server import uvicorn_config
        from agent.audit import AuditLog
        from agent.federated.supervisor import reap_stale
        from agent.metrics import Metrics

        self.paths.ensure_dirs()

        reap_stale(self.paths)  # a SuperNode left by an agent that died
        with self.installer.lock():
            self.store.boot(max_boots=self.config.max_boot_attempts)
        self.metrics = Metrics()
        lim = self.config.limits
        self.engine = Engine(
            queue_size=lim.queue_size,
            max_prompt_tokens=lim.max_prompt_tokens,
            metrics=self.metrics,
            on_inference=self._record_inference,
        )
        self.engine.start()
        audit = AuditLog(self.paths.audit_log, include_prompts=self.config.audit_prompts)
        self.reconcile()
        app = self._app(audit)
        threads = [
            threading.Thread(target=self._update_loop, name="edgellm-updates", daemon=True),
            threading.Thread(target=self._watch_loop, name="edgellm-watch", daemon=True),
        ]
        self._start_telemetry()
        try:
            with self._sockets() as socks:
                port = next((s.getsockname()[1] for s in socks if s.family != socket.AF_UNIX), None)
                atomic_write_json(
                    self.paths.run_info,
                    {"pid": os.getpid(), "port": port, "socket": self.socket_path, "started_at": time.time()},
                )
                for t in threads:
                    t.start()
                log.info(
                    "agent listening",
                    extra={"port": port, "socket": self.socket_path, "device_id": self.config.device_id},
                )
                _Server(uvicorn_config(app, lim, audit=audit, metrics=self.metrics, timeout_graceful_shutdown=5)).run(
                    sockets=socks
                )
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

    def _app(self, audit: Any) -> Any:
        from agent.api import AdminHooks, create_app
        from agent.federated.learn import recorder as learn_recorder
        from agent.provision import ensure_admin_token, read_token

        assert self.engine is not None and self.metrics is not None
        hooks = AdminHooks(
            status=lambda: status_dict(self.paths, self.config, self.telemetry),
            request_update=self.request_update,
            telemetry=self.telemetry.status,
            on_chat=learn_recorder(self.paths, self.config),
        )
        return create_app(
            engine=self.engine,
            token=read_token(self.paths),
            admin_token=ensure_admin_token(self.paths),
            limits=self.config.limits,
            metrics=self.metrics,
            audit=audit,
            hooks=hooks,
        )

    def _start_telemetry(self) -> None:
        self.telemetry.on_desired(self._on_desired)
        cmds = self.telemetry.commands
        cmds.register("update", self._command_update)
        cmds.register("rollback", self._command_rollback)
        cmds.register("retry", self._command_retry)
        from agent.logs import logs_command

        cmds.register("logs", logs_command)
        cmds.register("status", lambda args: status_dict(self.paths, self.config, self.telemetry))
        cmds.register("fl_invite", self._command_fl)
        cmds.register("fl_stop", lambda args: self._command_fl(args, stop=True))
        try:
            self.telemetry.start()
        except Exception as e:
            log.exception("telemetry did not start")
            from agent.telemetry_bridge import NoTelemetry

            self.telemetry = NoTelemetry("error", f"telemetry did not start: {type(e).__name__}: {e}")

    # -- commands from the control plane (ping and state are telemetry's own) --------------------

    def _command_update(self, args: dict[str, Any]) -> dict[str, Any]:
        self.request_update(UpdateRequest.parse(args))
        return {"accepted": True}

    def _command_rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        if args:
            raise ConfigError(f"rollback takes no arguments, got {sorted(args)}", hint="send an empty args object")
        res = self.installer.rollback()
        self.reconcile()
        return res

    def _command_retry(self, args: dict[str, Any]) -> dict[str, Any]:
        """Forget the rejected versions, then check the assignment again."""
        from agent.assignment import clear_rejected

        cleared = clear_rejected(self.installer)
        self._event("update.retry", cleared=cleared)
        self.request_update(UpdateRequest())
        return {"cleared": cleared}

    def _command_fl(self, args: dict[str, Any], *, stop: bool = False) -> dict[str, Any]:
        """Federated runs: start or stop this device's SuperNode (agent/federated; no torch here)."""
        from agent.federated import supervisor as fl

        handler = fl.handle_fl_stop if stop else fl.handle_fl_invite
        return handler(args, fl.AgentHandle(self.paths, self.config, self._event))

    def _record_inference(self, **kw: Any) -> None:
        self.telemetry.record_inference(**kw)


def _Server(config: Any) -> Any:  # noqa: N802 - reads as the class it makes
    """uvicorn's Server without re-raising the captured signal after a graceful stop."""
    import uvicorn

    class S(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
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

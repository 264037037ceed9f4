"""The agent's telemetry: what the device reports and what the control plane asks of it.

Three pieces, each small:

    Telemetry (here)           public interface, device state, heartbeat/metrics timers, desired state
    MqttLink (connection)      the MQTT connection, birth/death, outbox pump, backoff
    CommandRegistry (commands) command name -> handler; a Dispatcher thread runs handlers/callbacks

Callers on any thread only write to the durable :class:`~agent.telemetry.outbox.Outbox`; one
worker thread owns the connection and the timers. It subscribes to the device's retained desired
state (per device and per group) and to its command topic.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.telemetry.aggregate import InferenceAggregator
from agent.telemetry.commands import CommandRegistry, Dispatcher
from agent.telemetry.connection import MqttLink
from agent.telemetry.outbox import Outbox
from edgellm import telemetry as wire
from edgellm.ids import ID_RULE, valid_id
from edgellm.telemetry import MqttConfig

logger = logging.getLogger(__name__)

AGENT_TELEMETRY_VERSION = "1"


class Telemetry:
    """Telemetry for one device. ``start()`` returns at once; the connection happens in the
    background and survives broker outages; nothing recorded is lost while the outbox has room."""

    def __init__(
        self,
        device_id: str,
        data_dir: Path,
        mqtt: MqttConfig,
        profile: str,
        group: str = "default",
        *,
        heartbeat_s: float = 30.0,
        metrics_interval_s: float = 60.0,
        outbox_max: int = 100_000,
        keepalive_s: int = 30,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        inflight: int = 64,
        flush_timeout_s: float = 5.0,
    ) -> None:
        for value, what in ((device_id, "device id"), (group, "group")):
            if not valid_id(value):
                raise wire.TelemetryError(f"{what} {value!r} is not valid for telemetry", hint=f"use {ID_RULE}")
        self.device_id = device_id
        self.data_dir = Path(data_dir)
        self.mqtt = mqtt
        self.profile = profile
        self.group = group
        self.heartbeat_s = heartbeat_s
        self.metrics_interval_s = metrics_interval_s
        self.flush_timeout_s = flush_timeout_s
        self.outbox = Outbox(self.data_dir / "telemetry" / "outbox.sqlite", max_messages=outbox_max)
        self.commands = CommandRegistry()
        self.commands.register("ping", lambda args: "pong")
        self.commands.register("state", lambda args: self._state_body())
        self.link = MqttLink(
            device_id,
            mqtt,
            self.outbox,
            subscriptions=[
                wire.desired_device_topic(device_id),
                wire.desired_group_topic(group),
                wire.command_topic(device_id),
            ],
            birth=self._birth,
            on_message=self._on_message,
            keepalive_s=keepalive_s,
            backoff_min_s=backoff_min_s,
            backoff_max_s=backoff_max_s,
            inflight=inflight,
        )
        self._agg = InferenceAggregator()
        self._state: dict[str, Any] = {"version": None, "model": None, "slot": None, "health": None}
        self._state_lock = threading.Lock()
        self._desired_cbs: list[Callable[[dict[str, Any]], None]] = []
        self._desired: dict[str, wire.Desired | None] = {"device": None, "group": None}
        self._last_delivered: tuple[str, str] | None = None
        self._dispatcher = Dispatcher(f"telemetry-cb-{device_id}")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = time.monotonic()
        self._reported_dropped = self.outbox.dropped

    # ------------------------------------------------------------------ public interface

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._dispatcher.start()
        self._thread = threading.Thread(target=self._run, name=f"telemetry-{self.device_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Flush metrics, deliver what the outbox holds (bounded wait), say goodbye, disconnect."""
        if self._thread is None:
            self.outbox.close()
            return
        self._stop.set()
        self._thread.join(timeout=self.flush_timeout_s + 10)
        self._dispatcher.stop()
        self._thread = None
        self.outbox.close()

    @property
    def connected(self) -> bool:
        return self.link.connected.is_set()

    connects = property(lambda self: self.link.connects)
    rejected = property(lambda self: self.link.rejected)
    unrouted = property(lambda self: self.link.unrouted)

    def status(self) -> dict[str, Any]:
        """For the daemon's status and /healthz: ``state`` connected | connecting | error (the worker
        died), the last connection error, the outbox backlog."""
        dead = self._thread is not None and not self._thread.is_alive() and not self._stop.is_set()
        state = "error" if dead else "connected" if self.connected else "connecting"
        return {
            "state": state,
            "broker": self.mqtt.url,
            "error": self.link.last_error,
            "outbox_pending": len(self.outbox),
            "outbox_dropped": self.outbox.dropped,
        }

    def set_state(
        self,
        *,
        version: str | None = None,
        model: str | None = None,
        slot: str | None = None,
        health: str | None = None,
    ) -> None:
        """Update what the device runs; changes are reported at once in a heartbeat. A version or
        model change first closes the current metrics interval, so every interval is attributed
        to the model that served it (rollout gates compare versions)."""
        with self._state_lock:
            switching = (version is not None and version != self._state["version"]) or (
                model is not None and model != self._state["model"]
            )
        if switching:
            self.flush_metrics()
        changed = False
        with self._state_lock:
            for k, v in (("version", version), ("model", model), ("slot", slot), ("health", health)):
                if v is not None and self._state[k] != v:
                    self._state[k] = v
                    changed = True
        if changed:
            self._put_heartbeat()

    def set_group(self, group: str) -> None:
        """The fleet moved this device to ``group``: report it at once (heartbeats carry it)."""
        if not valid_id(group):
            raise ValueError(f"group {group!r} is not a valid id")
        self.group = group
        self._put_heartbeat()

    def record_inference(
        self,
        *,
        latency_ms: float,
        prompt_tokens: int,
        completion_tokens: int,
        tokens_per_second: float,
        mean_logprob: float | None = None,
        error: bool = False,
    ) -> None:
        self._agg.add(
            latency_ms=latency_ms,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            tokens_per_second=tokens_per_second,
            mean_logprob=mean_logprob,
            error=error,
        )

    def event(self, kind: str, **fields: Any) -> None:
        self._put("event", wire.Event(name=kind, fields=fields).to_dict())

    def on_desired(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """``callback(dict(model=..., version=..., rollout=..., rollback=bool, source="device"|"group"))``
        whenever the effective desired state changes (a per-device one overrides the group's).
        ``rollback=True`` means the server deliberately sends the device back to an older version."""
        self._desired_cbs.append(callback)

    def flush_metrics(self) -> None:
        """Close the current metrics interval now (normally done every ``metrics_interval_s``)."""
        summary = self._agg.drain()
        if summary is None:
            return
        with self._state_lock:
            version, model = self._state["version"], self._state["model"]
        self._put(
            "metrics",
            wire.Metrics(interval_s=self.metrics_interval_s, version=version, model=model, **summary).to_dict(),
        )

    def wait_delivered(self, timeout: float = 10.0) -> bool:
        """Block until the outbox is empty (everything acknowledged by the broker)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.outbox) == 0:
                return True
            time.sleep(0.02)
        return len(self.outbox) == 0

    # ------------------------------------------------------------------ outbox writes

    def _put(self, kind: str, body: dict[str, Any]) -> int:
        topic = wire.device_topic(self.device_id, kind)
        return self.outbox.put(
            topic,
            lambda seq: wire.Envelope(
                device=self.device_id, kind=kind, seq=seq, ts=time.time(), body=body, epoch=self.outbox.epoch
            ).to_json(),
        )

    def _state_body(self) -> dict[str, Any]:
        with self._state_lock:
            return dict(self._state)

    def _birth(self, session: str) -> dict[str, Any]:
        return wire.Birth(
            session=session,
            profile=self.profile,
            group=self.group,
            agent_version=AGENT_TELEMETRY_VERSION,
            **self._state_body(),
        ).to_dict()

    def _put_heartbeat(self) -> None:
        hb = wire.Heartbeat(
            uptime_s=round(time.monotonic() - self._started_at, 3),
            profile=self.profile,
            group=self.group,
            outbox_pending=len(self.outbox),
            outbox_dropped=self.outbox.dropped,
            **self._state_body(),
        )
        self._put("heartbeat", hb.to_dict())

    def _report_drops(self) -> None:
        dropped = self.outbox.dropped
        if dropped != self._reported_dropped:
            newly = dropped - self._reported_dropped
            self._reported_dropped = dropped
            self._put(
                "event",
                wire.Event(name="outbox_overflow", fields={"dropped": newly, "dropped_total": dropped}).to_dict(),
            )

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        next_hb = time.monotonic()
        next_metrics = time.monotonic() + self.metrics_interval_s
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_hb:
                    self._put_heartbeat()
                    next_hb = now + self.heartbeat_s
                if now >= next_metrics:
                    self.flush_metrics()
                    next_metrics = now + self.metrics_interval_s
                self._report_drops()
                self.link.tick(self._stop)
        except Exception:  # pragma: no cover - keep the daemon informed, never die silently
            logger.exception("telemetry worker crashed")
            self.link.last_error = "telemetry worker crashed; see the agent log"
        finally:
            self.flush_metrics()
            self.link.close(self.flush_timeout_s)

    def _on_message(self, topic: str, payload: bytes) -> None:
        """A message on a subscribed topic (worker thread): queue what it asks for the dispatcher."""
        try:
            if topic == wire.command_topic(self.device_id):
                cmd = wire.Command.from_dict(json.loads(payload))

                def answer() -> None:
                    self._put("reply", self.commands.run(cmd))

                self._dispatcher.put(answer)
                return
            which = "device" if topic == wire.desired_device_topic(self.device_id) else "group"
            self._desired[which] = wire.Desired.from_json(payload) if payload else None
        except (ValueError, wire.TelemetryError) as e:
            logger.warning("telemetry: ignoring malformed message on %s: %s", topic, e)
            return
        eff = self._desired["device"] or self._desired["group"]
        if eff is None or (eff.model, eff.version) == self._last_delivered:
            return
        self._last_delivered = (eff.model, eff.version)
        desired = {k: v for k, v in eff.to_dict().items() if k not in ("v", "issued_at")}
        desired["source"] = "device" if eff is self._desired["device"] else "group"
        for cb in list(self._desired_cbs):
            self._dispatcher.put(functools.partial(cb, dict(desired)))

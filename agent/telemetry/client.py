"""The agent's telemetry client: paho-mqtt 2.x behind a small interface.

One worker thread owns the MQTT connection (a fresh paho client per connection attempt, so no
library state survives a reconnect) and the timers; callers on any thread only write to the
durable :class:`~agent.telemetry.outbox.Outbox`. Sequence::

    caller -> Outbox (SQLite, seq allocated) -> worker publishes QoS 1 -> PUBACK -> row deleted

On every connect the agent sends a birth message and registers a last will (death) carrying
the same ``session`` id; it subscribes to its retained desired state (per device and per
group) and to its command topic. Reconnects use exponential backoff with full jitter.
"""

from __future__ import annotations

import logging
import queue
import random
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgellm import telemetry as wire
from edgellm.telemetry import MqttConfig

from agent.telemetry.aggregate import InferenceAggregator
from agent.telemetry.outbox import Outbox

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
        if not wire.valid_id(device_id):
            raise wire.TelemetryError(f"device id {device_id!r} is not valid",
                                      hint="use 1-128 characters of [A-Za-z0-9._-]")
        if not wire.valid_id(group):
            raise wire.TelemetryError(f"group {group!r} is not valid", hint="use 1-128 characters of [A-Za-z0-9._-]")
        self.device_id = device_id
        self.data_dir = Path(data_dir)
        self.mqtt = mqtt
        self.profile = profile
        self.group = group
        self.heartbeat_s = heartbeat_s
        self.metrics_interval_s = metrics_interval_s
        self.keepalive_s = keepalive_s
        self.backoff = (backoff_min_s, backoff_max_s)
        self.inflight_max = inflight
        self.flush_timeout_s = flush_timeout_s
        self.outbox = Outbox(self.data_dir / "telemetry" / "outbox.sqlite", max_messages=outbox_max)
        self._agg = InferenceAggregator()
        self._state: dict[str, Any] = {"version": None, "model": None, "slot": None, "health": None}
        self._state_lock = threading.Lock()
        self._desired_cbs: list[Callable[[dict[str, Any]], None]] = []
        self._command_cb: Callable[[str, dict[str, Any]], Any] | None = None
        self._desired = {"device": None, "group": None}
        self._last_delivered: tuple[str, str] | None = None
        self._dispatch_q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dispatcher: threading.Thread | None = None
        self._client: Any = None
        self._connected = threading.Event()
        self._session = ""
        self._inflight: dict[int, int] = {}
        self._acked: list[int] = []
        self._unrouted = False
        self._hold_until = 0.0
        self._hold_s = 0.5
        self._birth_mid: int | None = None
        self._rebirth = False
        self._cursor = 0
        self._attempts = 0
        self._next_attempt = 0.0
        self._connect_deadline = 0.0
        self._started_at = time.monotonic()
        self._reported_dropped = self.outbox.dropped
        self.connects = 0
        self.rejected = 0
        self.unrouted = 0

    # ------------------------------------------------------------------ public interface

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name=f"telemetry-cb-{self.device_id}", daemon=True)
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
        self._dispatch_q.put(None)
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=5)
        self._thread = None
        self.outbox.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def set_state(self, *, version: str | None = None, model: str | None = None, slot: str | None = None,
                  health: str | None = None) -> None:
        """Update what the device runs; changes are reported at once in a heartbeat. A version or
        model change first closes the current metrics interval, so every interval is attributed
        to the model that served it (rollout gates compare versions)."""
        with self._state_lock:
            switching = (version is not None and version != self._state["version"]) or \
                        (model is not None and model != self._state["model"])
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

    def record_inference(self, *, latency_ms: float, prompt_tokens: int, completion_tokens: int,
                         tokens_per_second: float, mean_logprob: float | None = None, error: bool = False) -> None:
        self._agg.add(latency_ms=latency_ms, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      tokens_per_second=tokens_per_second, mean_logprob=mean_logprob, error=error)

    def event(self, kind: str, **fields: Any) -> None:
        self._put("event", wire.Event(name=kind, fields=fields).to_dict())

    def on_desired(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """``callback(dict(model=..., version=..., rollout=..., rollback=bool, source="device"|"group"))``
        whenever the effective desired state changes (a per-device one overrides the group's).
        ``rollback=True`` means the server deliberately sends the device back to an older version."""
        self._desired_cbs.append(callback)

    def on_command(self, callback: Callable[[str, dict[str, Any]], Any]) -> None:
        """``callback(name, args) -> result`` for commands other than the built-in ping/state."""
        self._command_cb = callback

    def flush_metrics(self) -> None:
        """Close the current metrics interval now (normally done every ``metrics_interval_s``)."""
        summary = self._agg.drain()
        if summary is None:
            return
        with self._state_lock:
            version, model = self._state["version"], self._state["model"]
        self._put("metrics", wire.Metrics(interval_s=self.metrics_interval_s, version=version, model=model,
                                          **summary).to_dict())

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
            topic, lambda seq: wire.Envelope(device=self.device_id, kind=kind, seq=seq, ts=time.time(), body=body,
                                             epoch=self.outbox.epoch).to_json())

    def _state_body(self) -> dict[str, Any]:
        with self._state_lock:
            return dict(self._state)

    def _put_heartbeat(self) -> None:
        hb = wire.Heartbeat(uptime_s=round(time.monotonic() - self._started_at, 3), profile=self.profile,
                            group=self.group, outbox_pending=len(self.outbox), outbox_dropped=self.outbox.dropped,
                            **self._state_body())
        self._put("heartbeat", hb.to_dict())

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
                if self._client is None:
                    if now >= self._next_attempt:
                        self._connect()
                    else:
                        self._stop.wait(min(0.05, self._next_attempt - now))
                    continue
                self._step(0.05)
        except Exception:  # pragma: no cover - keep the daemon informed, never die silently
            logger.exception("telemetry worker crashed")
        finally:
            self._shutdown()

    def _step(self, timeout: float) -> None:
        from paho.mqtt.enums import MQTTErrorCode

        client = self._client
        rc = client.loop(timeout=timeout)
        if self._acked:
            acked, self._acked = self._acked, []
            self.outbox.ack(acked)
        if self._client is None:
            return
        if self._unrouted:
            # The broker had no subscriber (no server yet, or a restarted broker lost the server's
            # shared subscription): keep those rows and offer them again a little later.
            self._unrouted = False
            self._hold_until = time.monotonic() + self._hold_s
            self._hold_s = min(self._hold_s * 2, 10.0)
            self._cursor = 0
            if self.unrouted == 1 or self.unrouted % 100 == 0:
                logger.info("telemetry: broker has no subscriber for our messages yet; holding them in the outbox")
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost(f"loop: {rc}")
            return
        if not self._connected.is_set():
            if time.monotonic() > self._connect_deadline:
                self._lost("no CONNACK in time")
            return
        self._pump()

    def _pump(self) -> None:
        if time.monotonic() < self._hold_until:
            return
        if self._rebirth:
            self._rebirth = False
            self._publish_birth(self._client)
        room = self.inflight_max - len(self._inflight)
        if room <= 0 or self._cursor >= self.outbox.last_seq:
            return  # window full, or nothing newer than what was already offered
        busy = set(self._inflight.values())
        for row in self.outbox.pending(after_seq=self._cursor, limit=room):
            self._cursor = row.seq
            if row.seq in busy:
                continue
            info = self._client.publish(row.topic, row.payload, qos=1)
            if info.rc != 0:
                self._lost(f"publish: {info.rc}")
                return
            self._inflight[info.mid] = row.seq

    def _report_drops(self) -> None:
        dropped = self.outbox.dropped
        if dropped != self._reported_dropped:
            newly = dropped - self._reported_dropped
            self._reported_dropped = dropped
            self._put("event", wire.Event(name="outbox_overflow", fields={"dropped": newly, "dropped_total": dropped}).to_dict())

    def _backoff(self) -> None:
        lo, hi = self.backoff
        cap = min(hi, lo * (2 ** min(self._attempts, 20)))
        self._attempts += 1
        self._next_attempt = time.monotonic() + lo / 2 + random.uniform(0, cap)  # full jitter, floor lo/2

    def _connect(self) -> None:
        import paho.mqtt.client as mqtt

        self._session = f"{int(time.time() * 1000):x}-{secrets.token_hex(3)}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=mqtt.MQTTv5)
        client.connect_timeout = 5.0
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        will = wire.Envelope(device=self.device_id, kind="death", seq=0, ts=time.time(),
                             body=wire.Death(session=self._session, reason="lost").to_dict())
        client.will_set(wire.device_topic(self.device_id, "death"), will.to_json(), qos=1, retain=False)
        try:
            self.mqtt.apply_tls(client)
            client.connect(self.mqtt.host, self.mqtt.port, keepalive=self.keepalive_s, clean_start=True)
        except Exception as e:  # OSError, ssl.SSLError, ...: the broker is away or refused us
            logger.info("telemetry: cannot connect to %s (%s); retrying", self.mqtt.url, e)
            try:
                client.socket() and client.socket().close()
            except Exception:
                pass
            self._backoff()
            return
        self._client = client
        self._connect_deadline = time.monotonic() + 10.0

    def _lost(self, why: str) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            except Exception:
                pass
            try:
                sock = client.socket()
                if sock is not None:
                    sock.close()
            except Exception:
                pass
        if self._acked:
            acked, self._acked = self._acked, []
            self.outbox.ack(acked)
        self._inflight.clear()
        self._cursor = 0
        if was:
            logger.info("telemetry: connection lost (%s); reconnecting", why)
        self._backoff()

    # paho callbacks (run inside client.loop() on the worker thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            logger.warning("telemetry: broker refused the connection: %s", reason_code)
            self._lost(f"CONNACK {reason_code}")
            return
        self._connected.set()
        self._attempts = 0
        self.connects += 1
        self._inflight.clear()
        self._cursor = 0
        for t in (wire.desired_device_topic(self.device_id), wire.desired_group_topic(self.group),
                  wire.command_topic(self.device_id)):
            client.subscribe(t, qos=1)
        self._rebirth = False
        self._hold_until = 0.0
        self._publish_birth(client)
        logger.info("telemetry: connected to %s as %s", self.mqtt.url, self.device_id)

    def _publish_birth(self, client: Any) -> None:
        birth = wire.Birth(session=self._session, profile=self.profile, group=self.group,
                           agent_version=AGENT_TELEMETRY_VERSION, **self._state_body())
        env = wire.Envelope(device=self.device_id, kind="birth", seq=0, ts=time.time(), body=birth.to_dict())
        self._birth_mid = client.publish(wire.device_topic(self.device_id, "birth"), env.to_json(), qos=1).mid

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        no_subscriber = getattr(reason_code, "value", 0) == 0x10  # MQTT 5 "No matching subscribers"
        if mid == self._birth_mid and no_subscriber:
            self._rebirth = True
            self._unrouted = True
        seq = self._inflight.pop(mid, None)
        if seq is None:
            return  # birth / death, not from the outbox
        if no_subscriber:
            self.unrouted += 1
            self._unrouted = True
            return  # stays in the outbox
        self._hold_s = 0.5
        if reason_code.is_failure:
            self.rejected += 1
            logger.warning("telemetry: broker rejected message seq=%d: %s (dropped)", seq, reason_code)
        self._acked.append(seq)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            if msg.topic == wire.command_topic(self.device_id):
                self._handle_command(msg.payload)
                return
            which = "device" if msg.topic == wire.desired_device_topic(self.device_id) else "group"
            self._desired[which] = wire.Desired.from_json(msg.payload) if msg.payload else None
        except wire.TelemetryError as e:
            logger.warning("telemetry: ignoring malformed message on %s: %s", msg.topic, e)
            return
        eff = self._desired["device"] or self._desired["group"]
        if eff is None:
            return
        key = (eff.model, eff.version)
        if key == self._last_delivered:
            return
        self._last_delivered = key
        source = "device" if eff is self._desired["device"] else "group"
        desired = {k: v for k, v in eff.to_dict().items() if k not in ("v", "issued_at")}
        desired["source"] = source
        self._dispatch_q.put(desired)

    def _handle_command(self, payload: bytes) -> None:
        import json

        try:
            cmd = wire.Command.from_dict(json.loads(payload))
        except (ValueError, wire.TelemetryError) as e:
            logger.warning("telemetry: malformed command: %s", e)
            return
        self._dispatch_q.put(("command", cmd))

    def _dispatch_loop(self) -> None:
        while True:
            item = self._dispatch_q.get()
            if item is None:
                return
            if isinstance(item, tuple):
                self._run_command(item[1])
                continue
            for cb in list(self._desired_cbs):
                try:
                    cb(dict(item))
                except Exception:
                    logger.exception("telemetry: desired-state callback failed")

    def _run_command(self, cmd: wire.Command) -> None:
        body: dict[str, Any] = {"id": cmd.id, "name": cmd.name}
        try:
            if cmd.name == "ping":
                body.update(ok=True, result="pong")
            elif cmd.name == "state":
                body.update(ok=True, result=self._state_body())
            elif self._command_cb is not None:
                body.update(ok=True, result=self._command_cb(cmd.name, dict(cmd.args)))
            else:
                body.update(ok=False, error=f"unknown command {cmd.name!r}")
        except Exception as e:
            body.update(ok=False, error=str(e))
        self._put("reply", body)

    def _shutdown(self) -> None:
        self.flush_metrics()
        if self._client is not None and self._connected.is_set():
            deadline = time.monotonic() + self.flush_timeout_s
            while len(self.outbox) and time.monotonic() < deadline and self._client is not None:
                if time.monotonic() < self._hold_until:
                    break  # nobody subscribed: the outbox keeps them for the next run
                self._step(0.02)
            if self._client is not None:
                try:
                    bye = wire.Envelope(device=self.device_id, kind="death", seq=0, ts=time.time(),
                                        body=wire.Death(session=self._session, reason="stop").to_dict())
                    info = self._client.publish(wire.device_topic(self.device_id, "death"), bye.to_json(), qos=1)
                    end = time.monotonic() + 2.0
                    while not info.is_published() and time.monotonic() < end and self._client is not None:
                        self._client.loop(timeout=0.02)
                    if self._client is not None:
                        self._client.disconnect()
                        self._client.loop(timeout=0.05)
                except Exception as e:
                    logger.debug("telemetry: goodbye failed: %s", e)
        self._connected.clear()
        self._client = None

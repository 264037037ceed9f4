"""The MQTT connection of one device and the outbox pump (paho-mqtt 2.x behind a small class).

Only the telemetry worker thread calls into :class:`MqttLink`; paho's callbacks run inside
``client.loop()`` on that same thread. A fresh paho client is made per connection attempt, so no
library state survives a reconnect. Sequence::

    Outbox (SQLite, seq allocated) -> publish QoS 1 (window of ``inflight``) -> PUBACK -> row deleted

On every connect: a last will (death) and a birth carrying the same ``session`` id, then the
subscriptions. Reconnects use exponential backoff with full jitter.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.telemetry.outbox import Outbox
from edgellm import telemetry as wire
from edgellm.telemetry import MqttConfig

logger = logging.getLogger(__name__)

NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 reason code


class MqttLink:
    def __init__(
        self,
        device_id: str,
        mqtt: MqttConfig,
        outbox: Outbox,
        *,
        subscriptions: list[str],
        birth: Callable[[str], dict[str, Any]],
        on_message: Callable[[str, bytes], None],
        keepalive_s: int = 30,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        inflight: int = 64,
    ) -> None:
        self.device_id = device_id
        self.mqtt = mqtt
        self.outbox = outbox
        self.subscriptions = subscriptions
        self.birth = birth  # session -> Birth body
        self.on_message = on_message  # (topic, payload), on the worker thread
        self.keepalive_s = keepalive_s
        self.backoff = (backoff_min_s, backoff_max_s)
        self.inflight_max = inflight
        self.connected = threading.Event()
        self.client: Any = None
        self.session = ""
        self.attempts = 0
        self.connects = 0
        self.rejected = 0
        self.unrouted = 0
        self.last_error: str | None = None
        self._inflight: dict[int, int] = {}
        self._acked: list[int] = []
        self._unrouted = False
        self._hold_until = 0.0
        self._hold_s = 0.5
        self._birth_mid: int | None = None
        self._rebirth = False
        self._cursor = 0
        self._next_attempt = 0.0
        self._connect_deadline = 0.0

    # -- driving (worker thread) ----------------------------------------------------------------

    def tick(self, stop: threading.Event) -> None:
        """One round: connect when due, else run the network loop and pump the outbox."""
        if self.client is None:
            now = time.monotonic()
            if now >= self._next_attempt:
                self._connect()
            else:
                stop.wait(min(0.05, self._next_attempt - now))
            return
        self.step(0.05)

    def step(self, timeout: float) -> None:
        from paho.mqtt.enums import MQTTErrorCode

        rc = self.client.loop(timeout=timeout)
        self._ack_pending()
        if self.client is None:
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
        if not self.connected.is_set():
            if time.monotonic() > self._connect_deadline:
                self._lost("no CONNACK in time")
            return
        self._pump()

    @property
    def holding(self) -> bool:
        """Nobody subscribed lately: unsent rows wait in the outbox."""
        return time.monotonic() < self._hold_until

    def _ack_pending(self) -> None:
        if self._acked:
            acked, self._acked = self._acked, []
            self.outbox.ack(acked)

    def _pump(self) -> None:
        if self.holding:
            return
        if self._rebirth:
            self._rebirth = False
            self._publish_birth(self.client)
        room = self.inflight_max - len(self._inflight)
        if room <= 0 or self._cursor >= self.outbox.last_seq:
            return  # window full, or nothing newer than what was already offered
        busy = set(self._inflight.values())
        for row in self.outbox.pending(after_seq=self._cursor, limit=room):
            self._cursor = row.seq
            if row.seq in busy:
                continue
            info = self.client.publish(row.topic, row.payload, qos=1)
            if info.rc != 0:
                self._lost(f"publish: {info.rc}")
                return
            self._inflight[info.mid] = row.seq

    def _backoff(self) -> None:
        lo, hi = self.backoff
        cap = min(hi, lo * (2 ** min(self.attempts, 20)))
        self.attempts += 1
        self._next_attempt = time.monotonic() + lo / 2 + random.uniform(0, cap)  # full jitter, floor lo/2

    def _connect(self) -> None:
        import paho.mqtt.client as mqtt

        self.session = f"{int(time.time() * 1000):x}-{secrets.token_hex(3)}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=mqtt.MQTTv5)
        client.connect_timeout = 5.0
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = lambda c, u, msg: self.on_message(msg.topic, bytes(msg.payload))
        will = wire.Envelope(
            device=self.device_id,
            kind="death",
            seq=0,
            ts=time.time(),
            body=wire.Death(session=self.session, reason="lost").to_dict(),
        )
        client.will_set(wire.device_topic(self.device_id, "death"), will.to_json(), qos=1, retain=False)
        try:
            self.mqtt.apply_tls(client)
            client.connect(self.mqtt.host, self.mqtt.port, keepalive=self.keepalive_s, clean_start=True)
        except Exception as e:  # noqa: BLE001 - OSError, ssl.SSLError, ...: the broker is away or refused us
            self.last_error = f"cannot connect to {self.mqtt.url}: {e}"
            logger.info("telemetry: %s; retrying", self.last_error)
            _close_socket(client)
            self._backoff()
            return
        self.client = client
        self._connect_deadline = time.monotonic() + 10.0

    def _lost(self, why: str) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        client, self.client = self.client, None
        if client is not None:
            try:
                client.disconnect()
            except Exception:  # noqa: BLE001 - the socket may already be gone
                pass
            _close_socket(client)
        self._ack_pending()
        self._inflight.clear()
        self._cursor = 0
        self.last_error = why
        if was:
            logger.info("telemetry: connection lost (%s); reconnecting", why)
        self._backoff()

    # -- paho callbacks (inside client.loop() on the worker thread) ------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            logger.warning("telemetry: broker refused the connection: %s", reason_code)
            self._lost(f"CONNACK {reason_code}")
            return
        self.connected.set()
        self.attempts = 0
        self.connects += 1
        self.last_error = None
        self._inflight.clear()
        self._cursor = 0
        for t in self.subscriptions:
            client.subscribe(t, qos=1)
        self._rebirth = False
        self._hold_until = 0.0
        self._publish_birth(client)
        logger.info("telemetry: connected to %s as %s", self.mqtt.url, self.device_id)

    def _publish_birth(self, client: Any) -> None:
        env = wire.Envelope(device=self.device_id, kind="birth", seq=0, ts=time.time(), body=self.birth(self.session))
        self._birth_mid = client.publish(wire.device_topic(self.device_id, "birth"), env.to_json(), qos=1).mid

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected.clear()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        no_subscriber = getattr(reason_code, "value", 0) == NO_MATCHING_SUBSCRIBERS
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

    # -- goodbye ---------------------------------------------------------------------------------

    def close(self, flush_timeout_s: float) -> None:
        """Deliver what the outbox holds (bounded wait), say goodbye, disconnect."""
        if self.client is not None and self.connected.is_set():
            deadline = time.monotonic() + flush_timeout_s
            while len(self.outbox) and time.monotonic() < deadline and self.client is not None:
                if self.holding:
                    break  # nobody subscribed: the outbox keeps them for the next run
                self.step(0.02)
            if self.client is not None:
                try:
                    self._goodbye()
                except Exception as e:  # noqa: BLE001 - shutting down: a failed goodbye only loses the death message
                    logger.debug("telemetry: goodbye failed: %s", e)
        self.connected.clear()
        self.client = None

    def _goodbye(self) -> None:
        bye = wire.Envelope(
            device=self.device_id,
            kind="death",
            seq=0,
            ts=time.time(),
            body=wire.Death(session=self.session, reason="stop").to_dict(),
        )
        info = self.client.publish(wire.device_topic(self.device_id, "death"), bye.to_json(), qos=1)
        end = time.monotonic() + 2.0
        while not info.is_published() and time.monotonic() < end and self.client is not None:
            self.client.loop(timeout=0.02)
        if self.client is not None:
            self.client.disconnect()
            self.client.loop(timeout=0.05)


def _close_socket(client: Any) -> None:
    try:
        sock = client.socket()
        if sock is not None:
            sock.close()
    except Exception:  # noqa: BLE001 - best effort
        pass

"""Telemetry ingest: one MQTT 5 connection per server process.

* Subscribes with a shared subscription (``$share/edgellm/edgellm/v1/dev/+/+``) so several
  server processes split the load; a persistent session (``clean_start=False`` plus a session
  expiry) makes the broker queue messages while this process is away.
* Acknowledges manually, *after* the batch holding the message was committed: a crash between
  receive and commit means redelivery, never loss. Deduplication on (device, seq) in the store
  turns the resulting at-least-once into exactly-once storage.
* Writes in batches (up to ``batch_size`` messages or ``batch_s`` seconds per transaction).
* Malformed payloads (over the size limit, not JSON, wrong schema, wrong topic) are counted by
  reason, acknowledged and dropped; ingest keeps going.

The same connection publishes the server's retained desired state (see :meth:`publish`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from edgellm import telemetry as wire
from edgellm.telemetry import MqttConfig

from server.store import Store

logger = logging.getLogger(__name__)


class Ingest:
    def __init__(self, store: Store, mqtt: MqttConfig, *, client_id: str = "edgellm-server-1",
                 share_group: str = wire.SHARE_GROUP, batch_size: int = 200, batch_s: float = 0.05,
                 session_expiry_s: int = 7 * 24 * 3600) -> None:
        self.store = store
        self.mqtt = mqtt
        self.client_id = client_id
        self.share_group = share_group
        self.batch_size = batch_size
        self.batch_s = batch_s
        self.session_expiry_s = session_expiry_s
        self.counters: Counter[str] = Counter()
        self.connected = threading.Event()
        self.on_connect_hooks: list[Callable[[], None]] = []
        self._q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._client: Any = None
        self._counter_lock = threading.Lock()
        self._persisted: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5,
                        manual_ack=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.reconnect_delay_set(min_delay=1, max_delay=5)
        self.mqtt.apply_tls(c)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        self._client = c
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._writer.start()
        c.connect_async(self.mqtt.host, self.mqtt.port, keepalive=30, clean_start=False, properties=props)
        c.loop_start()

    def stop(self) -> None:
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout=10)
        if self._client is not None:
            try:
                self._client.disconnect()
            finally:
                self._client.loop_stop()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """True once connected *and* subscribed (the broker acknowledged the subscription)."""
        return self.connected.wait(timeout)

    # ------------------------------------------------------------------ publishing

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        """QoS 1 publish (queued by paho while disconnected)."""
        self._client.publish(topic, payload, qos=1, retain=retain)

    # ------------------------------------------------------------------ paho callbacks (network thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            logger.error("ingest: broker refused the connection: %s", reason_code)
            return
        client.subscribe(wire.shared_device_subscription(self.share_group), qos=1)
        logger.info("ingest: connected to %s (session present: %s)", self.mqtt.url, flags.session_present)
        for hook in list(self.on_connect_hooks):
            try:
                hook()
            except Exception:
                logger.exception("ingest: on-connect hook failed")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            logger.error("ingest: broker refused the subscription: %s", failed)
            return
        self.connected.set()  # messages published from now on reach us

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            logger.warning("ingest: disconnected (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        self._q.put((msg.mid, msg.qos, msg.topic, msg.payload))

    # ------------------------------------------------------------------ writer thread

    def _bump(self, name: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += n

    def parse(self, topic: str, payload: bytes) -> wire.Envelope | None:
        """Validate one message; count and return None if it must be dropped."""
        self._bump("received")
        if len(payload) > wire.MAX_PAYLOAD_BYTES:
            self._bump("malformed_oversized")
            return None
        where = wire.parse_device_topic(topic)
        if where is None:
            self._bump("malformed_topic")
            return None
        try:
            env = wire.Envelope.from_json(payload)
        except wire.TelemetryError as e:
            reason = "malformed_json" if "not JSON" in str(e) else "malformed_schema"
            self._bump(reason)
            logger.debug("ingest: dropping message on %s: %s", topic, e)
            return None
        if (env.device, env.kind) != where:
            self._bump("malformed_topic")
            return None
        return env

    def _write_loop(self) -> None:
        while not self._stop.is_set() or not self._q.empty():
            try:
                first = self._q.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.batch_s
            while len(batch) < self.batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self._q.get(timeout=left))
                except queue.Empty:
                    break
            envs = []
            for _mid, _qos, topic, payload in batch:
                env = self.parse(topic, payload)
                if env is not None:
                    envs.append(env)
            res = self._store_with_retry(envs)
            if res is None:
                return  # stopping: unacknowledged, the broker redelivers to the next session
            self._bump("stored", res["stored"])
            self._bump("duplicates", res["duplicates"])
            with self._counter_lock:
                dropped = {k: v for k, v in self.counters.items() if k.startswith("malformed")}
            self._persist_malformed(dropped)
            for mid, qos, _t, _p in batch:
                if qos > 0 and self._client is not None:
                    self._client.ack(mid, qos)

    def _store_with_retry(self, envs: list[wire.Envelope]) -> dict[str, int] | None:
        """Commit a batch; on a database error keep retrying the same batch (nothing is
        acknowledged before it is stored)."""
        delay = 0.5
        while True:
            try:
                return self.store.ingest(envs)
            except Exception:
                self._bump("store_errors")
                logger.exception("ingest: store write failed; retrying in %.1fs (messages stay unacknowledged)", delay)
                if self._stop.wait(delay):
                    return None
                delay = min(delay * 2, 30.0)

    def _persist_malformed(self, current: dict[str, int]) -> None:
        """Malformed counts also go to the store (the dashboard and CLI read them there)."""
        for k, v in current.items():
            delta = v - self._persisted.get(k, 0)
            if delta:
                self.store.count(k, delta)
                self._persisted[k] = v

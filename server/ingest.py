"""Telemetry ingest: one MQTT 5 connection per server process.

* Subscribes with a shared subscription (``$share/edgellm/edgellm/v1/dev/+/+``) so several
  server processes split the load; a persistent session (``clean_start=False`` plus a session
  expiry) makes the broker queue messages while this process is away.
* Acknowledges manually, *after* the batch holding the message was committed: a crash between
  receive and commit means redelivery, never loss. Deduplication on (device, seq) in the store
  turns the resulting at-least-once into exactly-once storage.
* Writes in batches: whatever has arrived, up to ``batch_size`` messages, waiting at most
  ``batch_s`` for more only while messages keep coming (the broker holds back what is over its
  in-flight limit until we acknowledge, so waiting on an idle queue would only stall it).
* Throughput (measured, docs/speed.md): paho reads each packet with 3+ one-byte ``recv`` calls
  and sends each PUBACK as its own packet and wake-up; with ``fast_path`` (the default,
  :mod:`server._mqtt_fast`) the socket is read through a 64 KiB buffer, QoS 1 PUBLISH packets are
  decoded straight into the writer's queue and a batch's PUBACKs leave in one write after commit.
* A message is refused at the boundary when it is over the size limit, not strict JSON, off the
  schema (every field typed and bounded by :mod:`edgellm.telemetry`) or on the wrong topic. A
  batch the database still refuses is split in halves until the message it cannot store is
  found. Refused messages are set aside in the store's quarantine (first bytes + reason),
  counted (``malformed_<reason>``) and acknowledged, so one bad device never stops the fleet's
  ingest and a restart does not bring the message back. A database that is down (I/O error,
  locked) is retried with the batch unacknowledged.

The same connection publishes the server's retained desired state (see :meth:`publish`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from edgellm import telemetry as wire
from edgellm.telemetry import MqttConfig
from server.errors import IngestError
from server.store import TRANSIENT as STORE_TRANSIENT
from server.store import Store

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: database errors worth retrying with the batch unacknowledged; anything else is the data's fault
TRANSIENT = STORE_TRANSIENT
#: how long the writer waits for one more message before committing what it has
LINGER_S = 0.005


class Incoming(NamedTuple):  # a tuple: made thousands of times a second by the network thread
    mid: int
    qos: int
    topic: str
    payload: bytes


class _Stopping(Exception):
    """Raised inside the writer when the server stops while a write is being retried."""


class Ingest:
    def __init__(
        self,
        store: Store,
        mqtt: MqttConfig,
        *,
        client_id: str = "edgellm-server-1",
        share_group: str = wire.SHARE_GROUP,
        batch_size: int = 500,
        batch_s: float = 0.05,
        session_expiry_s: int = 7 * 24 * 3600,
        fast_path: bool = True,
        receive_maximum: int | None = None,
    ) -> None:
        self.store = store
        self.mqtt = mqtt
        self.client_id = client_id
        self.share_group = share_group
        self.batch_size = batch_size
        self.batch_s = batch_s
        self.session_expiry_s = session_expiry_s
        self.fast_path = fast_path  # buffered reads, lean PUBLISH decode, batched PUBACKs (module doc)
        # unacknowledged messages the broker may hand us at once (MQTT 5 Receive Maximum): two
        # batches, so one is written while the next arrives; without it Mosquitto sends 20
        self.receive_maximum = min(receive_maximum or 2 * batch_size, 65535)
        self.counters: Counter[str] = Counter()
        self.connected = threading.Event()
        self.on_connect_hooks: list[Callable[[], None]] = []
        self._q: queue.SimpleQueue[Incoming] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._client: Any = None
        self._counter_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from server._mqtt_fast import FastClient

        cls = FastClient if self.fast_path else mqtt.Client
        c = cls(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5, manual_ack=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        if isinstance(c, FastClient):
            c.on_publish_fast = self._on_publish_fast
        c.on_subscribe = self._on_subscribe
        c.reconnect_delay_set(min_delay=1, max_delay=5)
        self.mqtt.apply_tls(c)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        props.ReceiveMaximum = self.receive_maximum
        self._client = c
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._writer.start()
        c.connect_async(self.mqtt.host, self.mqtt.port, keepalive=30, clean_start=False, properties=props)
        c.loop_start()

    def stop(self, *, end_session: bool = False) -> None:
        """Stop; with ``end_session`` the broker forgets this client id's session (and its share
        of the subscription) instead of queueing for it."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout=10)
        if self._client is not None:
            try:
                props = None
                if end_session:
                    from paho.mqtt.packettypes import PacketTypes
                    from paho.mqtt.properties import Properties

                    props = Properties(PacketTypes.DISCONNECT)
                    props.SessionExpiryInterval = 0
                self._client.disconnect(properties=props)
            finally:
                self._client.loop_stop()

    def leave_share(self) -> None:
        """Unsubscribe: the broker stops giving this session a share (what it queued still comes)."""
        self._client.unsubscribe(wire.shared_device_subscription(self.share_group))

    def idle(self) -> bool:
        """Nothing waiting to be written and everything received accounted for."""
        c = self.counters
        return self._q.empty() and c["received"] <= c["stored"] + c["duplicates"] + c["quarantined"]

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
        self._q.put(Incoming(msg.mid, msg.qos, msg.topic, msg.payload))

    def _on_publish_fast(self, mid: int, topic: str, payload: bytes) -> None:
        self._q.put(Incoming(mid, 1, topic, payload))

    # ------------------------------------------------------------------ writer thread

    def _bump(self, name: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += n

    def parse(self, topic: str, payload: bytes) -> wire.Envelope:
        """Validate one message; raises :class:`IngestError` (with its ``reason``) if refused."""
        where = wire.parse_device_topic(topic)
        if len(payload) > wire.MAX_PAYLOAD_BYTES:
            raise IngestError(f"payload of {len(payload)} bytes is over the limit", reason="oversized")
        if where is None:
            raise IngestError(f"{topic[:200]!r} is not a device topic", reason="topic")
        try:
            env = wire.Envelope.from_json(payload)
        except wire.TelemetryError as e:
            raise IngestError(str(e), reason=e.reason) from e
        if (env.device, env.kind) != where:
            raise IngestError(f"envelope says {env.device}/{env.kind} on topic {topic[:200]!r}", reason="topic")
        return env

    def _next_batch(self) -> list[Incoming]:
        try:
            batch = [self._q.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.batch_s
        while len(batch) < self.batch_size:
            try:
                batch.append(self._q.get_nowait())
                continue
            except queue.Empty:
                pass
            left = min(deadline - time.monotonic(), LINGER_S)
            if left <= 0:
                break
            try:  # a short linger: more is usually in flight; an idle queue ends the batch
                batch.append(self._q.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _write_loop(self) -> None:
        while not self._stop.is_set() or not self._q.empty():
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self._handle(batch)
            except _Stopping:
                return  # unacknowledged: the broker redelivers to the next session
            except Exception:  # a bug, not the data: keep the writer alive, leave the batch unacknowledged
                self._bump("writer_errors")
                logger.exception("ingest: could not handle a batch of %d messages", len(batch))
                continue
            self._ack(batch)

    def _ack(self, batch: list[Incoming]) -> None:
        c = self._client
        if c is None:
            return
        mids = [m.mid for m in batch if m.qos == 1]
        if self.fast_path and hasattr(c, "ack_many"):
            c.ack_many(mids)
        else:
            for mid in mids:
                c.ack(mid, 1)
        for m in batch:
            if m.qos == 2:
                c.ack(m.mid, 2)

    def _handle(self, batch: list[Incoming]) -> None:
        """Store what is good, set aside what is not; returns once both are committed."""
        self._bump("received", len(batch))
        self._bump("batches")
        good: list[tuple[Incoming, wire.Envelope]] = []
        refused: list[tuple[Incoming, IngestError]] = []
        for m in batch:
            try:
                good.append((m, self.parse(m.topic, m.payload)))
            except IngestError as e:
                refused.append((m, e))
        refused += self._store_split(good)
        if refused:
            for m, err in refused:
                logger.warning("ingest: set aside a message on %s (%s): %s", m.topic[:200], err.reason, str(err)[:300])
                self._bump(err.counter)
            self._bump("quarantined", len(refused))
            rows = [(m.topic, m.payload, err.reason, str(err)) for m, err in refused]
            self._retrying(lambda: self.store.quarantine(rows))

    def _store_split(self, items: list[tuple[Incoming, wire.Envelope]]) -> list[tuple[Incoming, IngestError]]:
        """Store ``items`` in one transaction; if the database refuses the data, halve the batch
        until the message it cannot store is alone. Returns the refused ones."""
        if not items:
            return []
        try:
            res = self._retrying(lambda: self.store.ingest([env for _, env in items]))
        except _Stopping:
            raise
        except Exception as e:  # noqa: BLE001 - the data's fault: split the batch to find the message
            if len(items) == 1:
                return [
                    (items[0][0], IngestError(f"the store refused it: {type(e).__name__}: {e}", reason="unstorable"))
                ]
            half = len(items) // 2
            return self._store_split(items[:half]) + self._store_split(items[half:])
        self._bump("stored", res["stored"])
        self._bump("duplicates", res["duplicates"])
        return []

    def _retrying(self, write: Callable[[], T]) -> T:
        """Run a store write; while the database itself fails keep retrying (nothing is
        acknowledged before it is stored). Raises :class:`_Stopping` if the server stops."""
        delay = 0.5
        while True:
            try:
                return write()
            except TRANSIENT:
                self._bump("store_errors")
                logger.exception("ingest: store write failed; retrying in %.1fs (messages stay unacknowledged)", delay)
                if self._stop.wait(delay):
                    raise _Stopping() from None
                delay = min(delay * 2, 30.0)

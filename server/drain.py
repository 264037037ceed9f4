"""Replicas that died for good keep their share of the telemetry: the broker queues messages
for a persistent session on a shared subscription even while its client is away (measured with
Mosquitto 2.0.11). Every replica announces itself with an ``ingest:<client id>`` lease; the
leader takes over the session of a replica whose lease ran out (connects with its client id,
stores what was queued, through the same ingest), then ends that session so the broker hands
its share to the live replicas. A replica that comes back later starts a fresh session."""

from __future__ import annotations

import logging
import threading
import time

from edgellm.telemetry import MqttConfig
from server.store import Store

logger = logging.getLogger(__name__)

PREFIX = "ingest:"


def drain_session(store: Store, mqtt: MqttConfig, client_id: str, *, quiet_s: float = 2.0, max_s: float = 60.0) -> int:
    """Store what the broker queued for ``client_id`` and end its session. Returns how many
    messages were received."""
    from server.ingest import Ingest

    ing = Ingest(store, mqtt, client_id=client_id)
    ing.start()
    try:
        if not ing.wait_connected(10):
            return 0
        ing.leave_share()  # no new share for this session; what it queued is delivered now
        deadline, last, seen_at = time.monotonic() + max_s, -1, time.monotonic()
        while time.monotonic() < deadline:
            n = ing.counters["received"]
            if n != last:
                last, seen_at = n, time.monotonic()
            elif ing.idle() and time.monotonic() - seen_at >= quiet_s:
                break
            time.sleep(0.2)
        return ing.counters["received"]
    finally:
        ing.stop(end_session=True)


class SessionJanitor:
    """Run on every tick: renews this replica's lease; on the leader, drains dead replicas."""

    def __init__(self, store: Store, mqtt: MqttConfig, client_id: str, holder: str, ttl_s: float) -> None:
        self.store, self.mqtt, self.client_id, self.holder, self.ttl_s = store, mqtt, client_id, holder, ttl_s
        self._busy: threading.Thread | None = None

    def tick(self, leading: bool) -> None:
        try:
            self.store.acquire_lease(PREFIX + self.client_id, self.holder, self.ttl_s)
            if not leading or (self._busy is not None and self._busy.is_alive()):
                return
            dead = [(n, h) for n, h in self.store.expired_leases(PREFIX, self.ttl_s) if n != PREFIX + self.client_id]
        except Exception:
            logger.exception("replica leases: the database did not answer")
            return
        if dead:
            self._busy = threading.Thread(target=self._drain, args=(dead[0],), name="session-drain", daemon=True)
            self._busy.start()

    def _drain(self, lease: tuple[str, str]) -> None:
        name, holder = lease
        dead_id = name[len(PREFIX) :]
        try:
            n = drain_session(self.store.reopen(), self.mqtt, dead_id)
            self.store.forget_lease(name, holder)
            logger.warning(
                "replica %s is gone: took over its broker session, stored %d queued message(s), ended the session",
                dead_id,
                n,
            )
        except Exception:
            logger.exception("draining the session of replica %s failed; trying again later", dead_id)

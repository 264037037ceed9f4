"""Which replica drives: several ``edgellm-server run`` processes share one database, all ingest
(through the broker's shared subscription) and serve the API, and exactly one — the holder of the
``leader`` lease in the store — drives rollouts, federated runs and TUF timestamp signing.

The holder renews the lease every tick; it is good for ``ttl_s`` (several ticks). When the
leader dies, the lease runs out and the next replica to try takes it, so a takeover happens
within ``ttl_s`` plus one tick. Replica clocks must agree to well under ``ttl_s`` (NTP).

Two drivers acting at once (a leader paused past its lease, say) cannot do one step twice:
every rollout move is a compare-and-set on the state the driver read
(:meth:`server.store.Store.set_rollout_state`).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time

from server.store import Store

logger = logging.getLogger(__name__)

LEASE = "leader"


class Leadership:
    def __init__(self, store: Store, name: str, *, ttl_s: float = 10.0) -> None:
        self.store = store
        self.holder = f"{name}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.ttl_s = ttl_s
        self.term: int | None = None
        self._renewed = 0.0

    @property
    def is_leader(self) -> bool:
        """True if this replica held the lease at its last check and it has not run out since."""
        return self.term is not None and time.monotonic() - self._renewed < self.ttl_s

    def check(self) -> bool:
        """Take or renew the lease. Returns True when this replica has *just become* leader
        (a new term: re-send what the previous leader may have left half-done)."""
        started = time.monotonic()
        try:
            term = self.store.acquire_lease(LEASE, self.holder, self.ttl_s)
        except Exception:
            logger.exception("leader lease: the database did not answer; not driving")
            term = None
        was = self.term
        self.term = term
        if term is None:
            if was is not None:
                logger.warning("leader lease lost (term %d): another replica drives now", was)
            return False
        self._renewed = started
        if term != was:
            logger.info("leader lease taken (term %d): this replica drives rollouts", term)
            return True
        return False

    def release(self) -> None:
        if self.term is not None:
            try:
                self.store.release_lease(LEASE, self.holder)
            except Exception:
                logger.exception("leader lease: release failed (it runs out by itself)")
            self.term = None

    def status(self) -> dict[str, object]:
        h = self.store.lease_holder(LEASE)
        return {
            "me": self.holder,
            "leader": self.is_leader,
            "holder": h[0] if h and h[1] > time.time() else None,
            "term": h[2] if h else None,
        }

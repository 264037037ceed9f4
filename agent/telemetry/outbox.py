"""Durable outbox: every telemetry message is written to SQLite before it is sent.

A row is deleted only when the broker acknowledged it (QoS 1 PUBACK). Sequence numbers are
allocated in the same transaction that stores the row, from a counter kept in the database, so
they stay monotonic across restarts and ``kill -9``. ``epoch`` is drawn once when the database is
created: a wiped outbox starts a new (epoch, seq) series the server will not mistake for duplicates.
The outbox is bounded: when full, the oldest rows are dropped and counted (``dropped``); the
agent reports the count in its heartbeats and an ``outbox_overflow`` event. One process owns an
outbox file at a time (counters are cached in memory).

SQLite runs in WAL mode with ``synchronous=NORMAL``: a committed row survives the process being
killed (it may not survive a power cut; ``synchronous="FULL"`` trades speed for that).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OutboxRow:
    seq: int
    topic: str
    payload: bytes


class Outbox:
    def __init__(self, path: str | Path, max_messages: int = 100_000, synchronous: str = "NORMAL") -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_messages = max_messages
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL,"
            " payload BLOB NOT NULL, created REAL NOT NULL)"
        )
        self._db.execute(
            "INSERT OR IGNORE INTO meta VALUES ('next_seq', 1), ('dropped', 0), ('epoch', ?)", (secrets.randbits(48),)
        )
        self.epoch = format(self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0], "012x")
        self._count = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self._last_seq = self._db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()[0] - 1
        self._dropped = self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()[0]

    # -- producer side

    def put(self, topic: str, make_payload: Callable[[int], bytes]) -> int:
        """Allocate the next sequence number, build the payload with it, store; returns seq."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                seq = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()[0]
                payload = make_payload(seq)
                db.execute("UPDATE meta SET value=? WHERE key='next_seq'", (seq + 1,))
                db.execute("INSERT INTO outbox VALUES (?,?,?,?)", (seq, topic, payload, time.time()))
                self._count += 1
                over = self._count - self.max_messages
                if over > 0:
                    cur = db.execute(
                        "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)", (over,)
                    )
                    self._count -= cur.rowcount
                    self._dropped += cur.rowcount
                    db.execute("UPDATE meta SET value=value+? WHERE key='dropped'", (cur.rowcount,))
                    logger.warning("outbox full (%d messages): dropped %d oldest", self.max_messages, cur.rowcount)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                self._count = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
                self._dropped = db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()[0]
                raise
            self._last_seq = seq
        return seq

    # -- sender side

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[OutboxRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
            ).fetchall()
        return [OutboxRow(s, t, bytes(p)) for s, t, p in rows]

    def ack(self, seqs: list[int] | int) -> None:
        """The broker acknowledged these: forget them."""
        if isinstance(seqs, int):
            seqs = [seqs]
        if not seqs:
            return
        with self._lock:
            cur = self._db.executemany("DELETE FROM outbox WHERE seq=?", [(s,) for s in seqs])
            self._count -= max(cur.rowcount, 0)

    # -- stats

    def __len__(self) -> int:
        return self._count

    @property
    def dropped(self) -> int:
        """Messages dropped because the outbox was full (ever, persisted)."""
        return self._dropped

    @property
    def last_seq(self) -> int:
        """The newest sequence number allocated (0 if none)."""
        return self._last_seq

    @property
    def next_seq(self) -> int:
        return self._last_seq + 1

    def close(self) -> None:
        with self._lock:
            self._db.close()

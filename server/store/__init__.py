"""The server's store: device registry, telemetry (deduplicated on device + epoch + seq), the
quarantine of refused messages, ingest counters, rollouts, API tokens, the operator audit log and
the leader lease. Every SQL statement of the server lives in this package; callers get typed rows
(:mod:`server.store.rows`).

Two databases, one interface: a SQLite file (``Store(path)``, the default; WAL mode, so the HTTP
threads, the ingest writer, the rollout driver and CLI processes can share it) or PostgreSQL
(``Store("postgresql://...")``, for several server replicas). :mod:`server.store.dialect` holds
what differs. One connection per thread either way.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from server.store.control import ControlTables
from server.store.dialect import (
    POSTGRES,
    SQLITE,
    Conn,
    PgConn,
    is_postgres,
    open_sqlite,
    redact_url,
    sqlite_tx,
    transient_errors,
)
from server.store.fleet import FleetTables, migrate_fleet
from server.store.rollouts import RolloutTables
from server.store.rows import (
    AuditRow,
    Choice,
    DeviceRow,
    EventRow,
    LogEntry,
    MetricSummary,
    QuarantineRow,
    RolloutDeviceRow,
    RolloutRow,
    SeriesPoint,
    TokenRow,
)
from server.store.schema import migrate
from server.store.telemetry import QUARANTINE_KEEP, QUARANTINE_PAYLOAD_BYTES, TelemetryTables

__all__ = [
    "TRANSIENT",
    "QUARANTINE_KEEP",
    "QUARANTINE_PAYLOAD_BYTES",
    "AuditRow",
    "Choice",
    "DeviceRow",
    "EventRow",
    "LogEntry",
    "MetricSummary",
    "QuarantineRow",
    "RolloutDeviceRow",
    "RolloutRow",
    "SeriesPoint",
    "Store",
    "TokenRow",
]

#: PostgreSQL connections kept for reuse by short-lived threads
POOL_SIZE = 8
#: database errors worth retrying (the data is not at fault), on either database
TRANSIENT = transient_errors()


def _while_locked(step: Callable[[], object], seconds: float = 30.0) -> None:
    """Run ``step`` (opening and migrating a SQLite file: idempotent), again while another process
    holds the file. Switching a new file to WAL can fail at once with "database is locked" instead
    of waiting (servers and replicas starting together); a column added by another process between
    our check and our ALTER fails once, then is seen."""
    deadline, other_seen = time.monotonic() + seconds, False
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as e:
            code = getattr(e, "sqlite_errorcode", None)  # Python 3.11+; 3.10: treat as busy
            busy = code is None or code & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED
            if time.monotonic() > deadline or (not busy and other_seen):
                raise  # a file that cannot be opened or a broken schema fails at the second try
            other_seen = other_seen or not busy
            time.sleep(0.05)


class Store(TelemetryTables, RolloutTables, ControlTables, FleetTables):
    """``target``: a SQLite file path, or a ``postgresql://`` URL."""

    def __init__(self, target: str | Path) -> None:
        self.url: str | None = str(target) if is_postgres(target) else None
        self.path: Path | None = None if self.url else Path(target)
        self.dialect = POSTGRES if self.url else SQLITE
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._pool: list[PgConn] = []  # PostgreSQL connections released by short-lived threads
        self._pool_lock = threading.Lock()
        if self.url:  # replicas starting together: one migrates at a time
            with self.tx() as db:
                db.execute("SELECT pg_advisory_xact_lock(7414)")
                migrate(db, self.dialect)
                migrate_fleet(db, self.dialect)
        else:
            _while_locked(self._migrate_sqlite)

    def _migrate_sqlite(self) -> None:
        migrate(self.db, self.dialect)
        migrate_fleet(self.db, self.dialect)

    def __repr__(self) -> str:
        return f"Store({redact_url(self.url) if self.url else str(self.path)!r})"

    def reopen(self) -> Store:
        """Another store on the same database (its own connections)."""
        return Store(self.url or self.path)  # type: ignore[arg-type]  # one of the two is always set

    @property
    def db(self) -> Conn:  # type: ignore[override]  # a per-thread connection instead of the base attribute
        db = getattr(self._local, "db", None)
        if isinstance(db, PgConn) and db.broken:
            db = None
        if db is None:
            with self._pool_lock:
                while self._pool and db is None:
                    db = self._pool.pop()
                    db = None if db.broken else db
            if db is None:
                db = PgConn(self.url) if self.url else open_sqlite(self.path)  # type: ignore[arg-type]  # path set when url is not
            self._local.db = db
        return db

    def release(self) -> None:
        """This thread is done with the store for now (an HTTP request thread, say): its
        PostgreSQL connection goes back to a small pool for the next thread; SQLite's is closed."""
        db = getattr(self._local, "db", None)
        self._local.db = None
        if isinstance(db, PgConn) and not db.broken:
            with self._pool_lock:
                if len(self._pool) < POOL_SIZE:
                    self._pool.append(db)
                    return
        if db is not None:
            db.close()

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def tx(self) -> AbstractContextManager[Any]:
        db = self.db
        return db.tx() if isinstance(db, PgConn) else sqlite_tx(db)  # type: ignore[arg-type]  # the other kind is sqlite3

"""The server's store: device registry, telemetry (deduplicated on device + epoch + seq), the
quarantine of refused messages, ingest counters, rollouts. Every SQL statement of the server
lives in this package; callers get typed rows (:mod:`server.store.rows`).

One connection per thread (WAL mode, so the HTTP threads, the ingest writer, the rollout
driver and CLI processes can all use the same file). A replicated deployment would put the
same tables in PostgreSQL; nothing here depends on SQLite beyond ``INSERT OR IGNORE``.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from types import TracebackType

from server.store.fleet import FLEET_SCHEMA, FleetTables
from server.store.rollouts import RolloutTables
from server.store.rows import (
    DeviceRow,
    EventRow,
    LogEntry,
    MetricSummary,
    QuarantineRow,
    RolloutDeviceRow,
    RolloutRow,
    SeriesPoint,
)
from server.store.schema import migrate
from server.store.telemetry import QUARANTINE_KEEP, QUARANTINE_PAYLOAD_BYTES, TelemetryTables

__all__ = ["QUARANTINE_KEEP", "QUARANTINE_PAYLOAD_BYTES", "DeviceRow", "EventRow", "LogEntry", "MetricSummary",
           "QuarantineRow", "RolloutDeviceRow", "RolloutRow", "SeriesPoint", "Store"]


class Store(TelemetryTables, RolloutTables, FleetTables):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        migrate(self.db)
        self.db.executescript(FLEET_SCHEMA)

    @property
    def db(self) -> sqlite3.Connection:  # type: ignore[override]
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def tx(self) -> _Tx:
        return _Tx(self.db)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.db.execute("COMMIT" if et is None else "ROLLBACK")

"""Tables of the server's store. Plain SQL (SQLite here; PostgreSQL takes the same tables)."""

from __future__ import annotations

import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, profile TEXT, grp TEXT NOT NULL DEFAULT 'default', version TEXT, model TEXT,
    slot TEXT, health TEXT, online INTEGER NOT NULL DEFAULT 0, session TEXT,
    first_seen REAL, last_seen REAL, outbox_dropped INTEGER NOT NULL DEFAULT 0, outbox_pending INTEGER NOT NULL DEFAULT 0,
    state_epoch TEXT, state_seq INTEGER NOT NULL DEFAULT 0, state_received REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    device TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, ts REAL NOT NULL,
    received REAL NOT NULL, body TEXT NOT NULL, PRIMARY KEY (device, epoch, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_received ON messages (received);
CREATE TABLE IF NOT EXISTS metrics (
    device TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, received REAL NOT NULL,
    version TEXT, model TEXT, count INTEGER NOT NULL, errors INTEGER NOT NULL, p50 REAL, p95 REAL, tps REAL,
    mean_logprob REAL, prompt_mean REAL, prompt_max INTEGER, completion INTEGER, PRIMARY KEY (device, epoch, seq)
);
CREATE INDEX IF NOT EXISTS metrics_received ON metrics (received);
CREATE TABLE IF NOT EXISTS events (
    device TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, received REAL NOT NULL,
    name TEXT NOT NULL, fields TEXT NOT NULL, PRIMARY KEY (device, epoch, seq)
);
CREATE INDEX IF NOT EXISTS events_received ON events (received);
CREATE INDEX IF NOT EXISTS events_device_name ON events (device, name, received);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT, received REAL NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, size INTEGER NOT NULL, payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL, grp TEXT NOT NULL, canary_pct REAL NOT NULL,
    gate TEXT NOT NULL, bake_s REAL NOT NULL, state TEXT NOT NULL, reason TEXT, paused INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, updated REAL NOT NULL, phase_started REAL, request TEXT
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout TEXT NOT NULL, device TEXT NOT NULL, phase TEXT NOT NULL, previous_version TEXT, previous_model TEXT,
    PRIMARY KEY (rollout, device)
);
CREATE TABLE IF NOT EXISTS rollout_log (
    rollout TEXT NOT NULL, ts REAL NOT NULL, state TEXT NOT NULL, message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollout_log_rollout ON rollout_log (rollout, ts);
"""

# Columns added after the first release: a store made before them gets them on open.
_ADDED_COLUMNS = {
    "devices": (("state_epoch", "TEXT"), ("state_seq", "INTEGER NOT NULL DEFAULT 0"),
                ("state_received", "REAL NOT NULL DEFAULT 0")),
}


def migrate(db: sqlite3.Connection) -> None:
    """Create what is missing (tables, indexes, columns); never drops anything."""
    for table, cols in _ADDED_COLUMNS.items():
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if have:
            for name, decl in cols:
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
    db.executescript(SCHEMA)

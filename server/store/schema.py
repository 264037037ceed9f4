"""Tables of the server's store, for SQLite and PostgreSQL: ``{REAL}``, ``{INT}``, ``{BLOB}``, ``{AUTOID}``,
``{NOROWID}`` and ``{LOGID}`` are filled in by :class:`server.store.dialect.Dialect`."""

from __future__ import annotations

from typing import Any

from server.store.dialect import Dialect

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, profile TEXT, grp TEXT NOT NULL DEFAULT 'default', version TEXT, model TEXT,
    slot TEXT, health TEXT, online {INT} NOT NULL DEFAULT 0, session TEXT,
    first_seen {REAL}, last_seen {REAL}, outbox_dropped {INT} NOT NULL DEFAULT 0, outbox_pending {INT} NOT NULL DEFAULT 0,
    state_epoch TEXT, state_seq {INT} NOT NULL DEFAULT 0, state_received {REAL} NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    device TEXT NOT NULL, epoch TEXT NOT NULL, seq {INT} NOT NULL, kind TEXT NOT NULL, ts {REAL} NOT NULL,
    received {REAL} NOT NULL, body TEXT NOT NULL, PRIMARY KEY (device, epoch, seq)
) {NOROWID};
CREATE INDEX IF NOT EXISTS messages_received ON messages (received);
CREATE TABLE IF NOT EXISTS metrics (
    device TEXT NOT NULL, epoch TEXT NOT NULL, seq {INT} NOT NULL, ts {REAL} NOT NULL, received {REAL} NOT NULL,
    version TEXT, model TEXT, count {INT} NOT NULL, errors {INT} NOT NULL, p50 {REAL}, p95 {REAL}, tps {REAL},
    mean_logprob {REAL}, prompt_mean {REAL}, prompt_max {INT}, completion {INT}, PRIMARY KEY (device, epoch, seq)
);
CREATE INDEX IF NOT EXISTS metrics_received ON metrics (received);
CREATE TABLE IF NOT EXISTS events (
    device TEXT NOT NULL, epoch TEXT NOT NULL, seq {INT} NOT NULL, ts {REAL} NOT NULL, received {REAL} NOT NULL,
    name TEXT NOT NULL, fields TEXT NOT NULL, PRIMARY KEY (device, epoch, seq)
);
CREATE INDEX IF NOT EXISTS events_received ON events (received);
CREATE INDEX IF NOT EXISTS events_device_name ON events (device, name, received);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value {INT} NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    id {AUTOID}, received {REAL} NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, size {INT} NOT NULL, payload {BLOB} NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL, grp TEXT NOT NULL, canary_pct {REAL} NOT NULL,
    gate TEXT NOT NULL, bake_s {REAL} NOT NULL, state TEXT NOT NULL, reason TEXT, paused {INT} NOT NULL DEFAULT 0,
    created {REAL} NOT NULL, updated {REAL} NOT NULL, phase_started {REAL}, request TEXT
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout TEXT NOT NULL, device TEXT NOT NULL, phase TEXT NOT NULL, previous_version TEXT, previous_model TEXT,
    PRIMARY KEY (rollout, device)
);
CREATE TABLE IF NOT EXISTS rollout_wire (
    rollout TEXT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    target TEXT, bytes {INT}, adapter TEXT, adapter_version TEXT, PRIMARY KEY (rollout, device)
);
CREATE TABLE IF NOT EXISTS rollout_log (
    rollout TEXT NOT NULL, ts {REAL} NOT NULL, state TEXT NOT NULL, message TEXT NOT NULL{LOGID}
);
CREATE INDEX IF NOT EXISTS rollout_log_rollout ON rollout_log (rollout, ts);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, hash TEXT NOT NULL, created {REAL} NOT NULL,
    revoked {REAL}, last_used {REAL}
);
CREATE TABLE IF NOT EXISTS audit_log (
    id {AUTOID}, ts {REAL} NOT NULL, token TEXT, who TEXT NOT NULL, role TEXT, action TEXT NOT NULL,
    target TEXT NOT NULL, status {INT} NOT NULL, result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_ts ON audit_log (ts);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires {REAL} NOT NULL, term {INT} NOT NULL
);
"""

# Columns added after the first release: a store made before them gets them on open.
_ADDED_COLUMNS = {
    "devices": (
        ("state_epoch", "TEXT"),
        ("state_seq", "{INT} NOT NULL DEFAULT 0"),
        ("state_received", "{REAL} NOT NULL DEFAULT 0"),
    ),
    "rollout_plans": (("release", "TEXT"),),  # server.store.fleet: the adapter / prefer a rollout ships
}


def migrate(db: Any, dialect: Dialect) -> None:
    """Create what is missing (tables, indexes, columns); never drops anything."""
    for table, cols in _ADDED_COLUMNS.items():
        for name, decl in cols:
            if dialect.name == "postgresql":
                db.execute(f"ALTER TABLE IF EXISTS {table} ADD COLUMN IF NOT EXISTS {name} {dialect.schema(decl)}")
                continue
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if have and name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {dialect.schema(decl)}")
    db.executescript(dialect.schema(SCHEMA))

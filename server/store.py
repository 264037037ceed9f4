"""The server's SQLite store: device registry, telemetry (deduplicated on device + seq),
ingest counters, rollouts.

One connection per thread (WAL mode, so the HTTP threads, the ingest writer, the rollout
driver and CLI processes can all use the same file). A replicated deployment would put the
same tables in PostgreSQL; nothing here depends on SQLite beyond ``INSERT OR IGNORE``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgellm import telemetry as wire

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, profile TEXT, grp TEXT NOT NULL DEFAULT 'default', version TEXT, model TEXT,
    slot TEXT, health TEXT, online INTEGER NOT NULL DEFAULT 0, session TEXT, state_ts REAL NOT NULL DEFAULT 0,
    first_seen REAL, last_seen REAL, outbox_dropped INTEGER NOT NULL DEFAULT 0, outbox_pending INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    device TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, ts REAL NOT NULL,
    received REAL NOT NULL, body TEXT NOT NULL, PRIMARY KEY (device, epoch, seq)
) WITHOUT ROWID;
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
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
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
"""

DEVICE_COLUMNS = ("id", "profile", "grp", "version", "model", "slot", "health", "online", "session",
                  "first_seen", "last_seen", "outbox_dropped", "outbox_pending")


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self.db
        db.executescript(SCHEMA)

    @property
    def db(self) -> sqlite3.Connection:
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

    # ------------------------------------------------------------------ ingest

    def ingest(self, envelopes: Iterable[wire.Envelope], received: float | None = None) -> dict[str, int]:
        """Store a batch in one transaction. Returns {"stored": n, "duplicates": n}."""
        now = received if received is not None else time.time()
        stored = dups = 0
        with self.tx() as db:
            for env in envelopes:
                if env.seq > 0:
                    cur = db.execute("INSERT OR IGNORE INTO messages VALUES (?,?,?,?,?,?,?)",
                                     (env.device, env.epoch, env.seq, env.kind, env.ts, now, json.dumps(env.body)))
                    if cur.rowcount == 0:
                        dups += 1
                        continue
                stored += 1
                self._apply(db, env, now)
            if stored or dups:
                db.executemany("INSERT INTO counters VALUES (?,?) ON CONFLICT(name) DO UPDATE SET value=value+excluded.value",
                               [("stored", stored), ("duplicates", dups)])
        return {"stored": stored, "duplicates": dups}

    def _touch(self, db: sqlite3.Connection, device: str, now: float) -> None:
        db.execute("INSERT INTO devices (id, first_seen, last_seen) VALUES (?,?,?) "
                   "ON CONFLICT(id) DO UPDATE SET last_seen=MAX(COALESCE(last_seen, 0), excluded.last_seen)",
                   (device, now, now))

    def _apply(self, db: sqlite3.Connection, env: wire.Envelope, now: float) -> None:
        self._touch(db, env.device, now)
        b = env.body
        if env.kind == "birth":
            db.execute("UPDATE devices SET online=1, session=?, profile=COALESCE(?, profile), grp=COALESCE(?, grp),"
                       " version=COALESCE(?, version), model=COALESCE(?, model), slot=COALESCE(?, slot),"
                       " health=COALESCE(?, health), state_ts=MAX(state_ts, ?) WHERE id=?",
                       (b.get("session"), b.get("profile") or None, b.get("group"), b.get("version"), b.get("model"),
                        b.get("slot"), b.get("health"), env.ts, env.device))
        elif env.kind == "death":
            db.execute("UPDATE devices SET online=0, state_ts=MAX(state_ts, ?) WHERE id=? AND session=?",
                       (env.ts, env.device, b.get("session")))
        elif env.kind == "heartbeat":
            db.execute("UPDATE devices SET version=COALESCE(?, version), model=COALESCE(?, model),"
                       " slot=COALESCE(?, slot), health=COALESCE(?, health), profile=COALESCE(?, profile),"
                       " grp=COALESCE(?, grp), outbox_dropped=?, outbox_pending=?, state_ts=? WHERE id=? AND state_ts<=?",
                       (b.get("version"), b.get("model"), b.get("slot"), b.get("health"), b.get("profile") or None,
                        b.get("group"), int(b.get("outbox_dropped") or 0), int(b.get("outbox_pending") or 0),
                        env.ts, env.device, env.ts))
        elif env.kind == "metrics":
            db.execute("INSERT OR IGNORE INTO metrics VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (env.device, env.epoch, env.seq, env.ts, now, b.get("version"), b.get("model"), int(b.get("count") or 0),
                        int(b.get("errors") or 0), b.get("p50_latency_ms"), b.get("p95_latency_ms"),
                        b.get("tokens_per_second"), b.get("mean_logprob"), b.get("prompt_tokens_mean"),
                        b.get("prompt_tokens_max"), int(b.get("completion_tokens") or 0)))
        elif env.kind == "event":
            db.execute("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?)",
                       (env.device, env.epoch, env.seq, env.ts, now, b.get("name", ""), json.dumps(b.get("fields", {}))))

    def prune(self, older_than_s: float) -> int:
        """Forget telemetry received more than ``older_than_s`` ago (messages, metrics, events).
        Deduplication only covers what is kept: keep longer than any outbox could hold a message."""
        cutoff = time.time() - older_than_s
        n = 0
        with self.tx() as db:
            for table in ("messages", "metrics", "events"):
                n += db.execute(f"DELETE FROM {table} WHERE received < ?", (cutoff,)).rowcount
        return n

    def count(self, name: str, n: int = 1) -> None:
        if n:
            self.db.execute("INSERT INTO counters VALUES (?,?) ON CONFLICT(name) DO UPDATE SET value=value+excluded.value",
                            (name, n))

    def counters(self) -> dict[str, int]:
        return {r["name"]: r["value"] for r in self.db.execute("SELECT name, value FROM counters ORDER BY name")}

    # ------------------------------------------------------------------ queries

    def devices(self, group: str | None = None, stale_after_s: float = 180.0) -> list[dict[str, Any]]:
        """Device registry rows. ``stale`` marks a device that is online by its last birth but
        has sent nothing for ``stale_after_s`` (a death may have been lost, e.g. broker restart)."""
        q = f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices"
        args: tuple = ()
        if group is not None:
            q += " WHERE grp=?"
            args = (group,)
        rows = [dict(r) for r in self.db.execute(q + " ORDER BY id", args)]
        now = time.time()
        for r in rows:
            r["group"] = r.pop("grp")
            r["online"] = bool(r["online"])
            r["stale"] = r["online"] and (r["last_seen"] or 0) < now - stale_after_s
        return rows

    def device(self, device_id: str) -> dict[str, Any] | None:
        for d in self.devices():
            if d["id"] == device_id:
                return d
        return None

    def message_seqs(self, device: str) -> list[int]:
        """Sequence numbers stored for a device (all epochs), in order."""
        return [r[0] for r in self.db.execute("SELECT seq FROM messages WHERE device=? ORDER BY epoch, seq", (device,))]

    def message_count(self, device: str | None = None, kind: str | None = None) -> int:
        q, args = "SELECT COUNT(*) FROM messages WHERE 1=1", []
        if device:
            q += " AND device=?"
            args.append(device)
        if kind:
            q += " AND kind=?"
            args.append(kind)
        return self.db.execute(q, args).fetchone()[0]

    def events(self, device: str | None = None, name: str | None = None, since: float = 0.0) -> list[dict[str, Any]]:
        q, args = "SELECT device, seq, ts, received, name, fields FROM events WHERE received>=?", [since]
        if device:
            q += " AND device=?"
            args.append(device)
        if name:
            q += " AND name=?"
            args.append(name)
        out = []
        for r in self.db.execute(q + " ORDER BY received, device, seq", args):
            d = dict(r)
            d["fields"] = json.loads(d["fields"])
            out.append(d)
        return out

    def metric_summary(self, devices: list[str], version: str | None, since: float) -> dict[str, Any]:
        """Count-weighted aggregate of metrics rows received since ``since`` from ``devices``
        running ``version``: count, errors, error_rate, p50/p95 latency (weighted mean of the
        per-interval percentiles), tokens/s, mean_logprob."""
        if not devices:
            return {"count": 0}
        marks = ",".join("?" * len(devices))
        q = (f"SELECT SUM(count) n, SUM(errors) e, SUM(p50*count)/SUM(CASE WHEN p50 IS NULL THEN 0 ELSE count END) p50,"
             f" SUM(p95*count)/SUM(CASE WHEN p95 IS NULL THEN 0 ELSE count END) p95,"
             f" SUM(tps*count)/SUM(CASE WHEN tps IS NULL THEN 0 ELSE count END) tps,"
             f" SUM(mean_logprob*count)/SUM(CASE WHEN mean_logprob IS NULL THEN 0 ELSE count END) lp,"
             f" MAX(p95) p95max FROM metrics WHERE device IN ({marks}) AND received>=?")
        args: list[Any] = [*devices, since]
        if version is not None:
            q += " AND version=?"
            args.append(version)
        r = self.db.execute(q, args).fetchone()
        n = r["n"] or 0
        return {
            "count": n, "errors": r["e"] or 0, "error_rate": (r["e"] or 0) / n if n else None,
            "p50_latency_ms": r["p50"], "p95_latency_ms": r["p95"], "tokens_per_second": r["tps"],
            "mean_logprob": r["lp"], "max_p95_latency_ms": r["p95max"],
        }

    def series(self, by: str = "version", since: float = 0.0, bucket_s: float = 60.0, device: str | None = None) -> list[dict[str, Any]]:
        """Time-bucketed metrics for charts, keyed by version or device."""
        key = "device" if by == "device" else "COALESCE(version, '?')"
        q = (f"SELECT {key} k, CAST(received/? AS INTEGER)*? t, SUM(count) n, SUM(errors) e,"
             " SUM(p95*count)/NULLIF(SUM(CASE WHEN p95 IS NULL THEN 0 ELSE count END),0) p95,"
             " SUM(p50*count)/NULLIF(SUM(CASE WHEN p50 IS NULL THEN 0 ELSE count END),0) p50,"
             " SUM(tps*count)/NULLIF(SUM(CASE WHEN tps IS NULL THEN 0 ELSE count END),0) tps,"
             " SUM(mean_logprob*count)/NULLIF(SUM(CASE WHEN mean_logprob IS NULL THEN 0 ELSE count END),0) lp"
             " FROM metrics WHERE received>=?")
        args: list[Any] = [bucket_s, bucket_s, since]
        if device:
            q += " AND device=?"
            args.append(device)
        q += " GROUP BY k, t ORDER BY k, t"
        return [{"key": r["k"], "t": r["t"], "count": r["n"], "errors": r["e"], "p95_latency_ms": r["p95"],
                 "p50_latency_ms": r["p50"], "tokens_per_second": r["tps"], "mean_logprob": r["lp"],
                 "error_rate": (r["e"] / r["n"]) if r["n"] else None}
                for r in self.db.execute(q, args)]


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, et, e, tb) -> None:
        self.db.execute("COMMIT" if et is None else "ROLLBACK")

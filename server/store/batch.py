"""One ingest batch as a few bulk statements (measured: docs/speed.md "Telemetry ingest").

:meth:`server.store.telemetry.TelemetryTables.ingest` stores a batch in one transaction; this
module does the work per table instead of per message:

* **deduplication in bulk**: sequenced messages (seq >= 1) go into ``messages`` keyed on
  (device, epoch, seq). A repeat inside the batch is a duplicate without a query; against the
  table, SQLite inserts the whole batch with one ``executemany`` inside a savepoint and, only if a
  key already exists (a redelivery), rolls back to it and inserts row by row, reading each row's
  count; PostgreSQL inserts with ``ON CONFLICT DO NOTHING RETURNING`` the keys it stored (one
  round trip, exact under concurrent replicas). Only stored messages change anything else.
* **one row per device**: the registry row (``last_seen``) once per device and batch; events and
  metrics with one ``executemany`` each.
* **device state once per device**: heartbeats follow decision 0008 (within an outbox epoch in
  sequence order, across epochs by receive time). The device's state columns are read once in the
  transaction (its row is already locked by the registry upsert), the heartbeats are folded in
  batch order exactly as one conditional ``UPDATE`` each would apply them, and the result is
  written once. A birth or death in between is applied at its place, so the order of state
  changes is the one the messages had.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from edgellm import telemetry as wire
from server.store.dialect import Conn, PgConn

#: the JSON text of a stored body (``json.dumps(..., allow_nan=False)`` without building an encoder per call)
encode = json.JSONEncoder(allow_nan=False).encode

_INSERT = "INSERT INTO messages VALUES "
_ROW = "(?,?,?,?,?,?,?)"
_DEVICE = (
    "INSERT INTO devices (id, first_seen, last_seen) VALUES (?,?,?) ON CONFLICT(id) DO UPDATE"
    " SET last_seen=CASE WHEN COALESCE(devices.last_seen, 0) > excluded.last_seen"
    " THEN devices.last_seen ELSE excluded.last_seen END"
)
_EVENT = "INSERT INTO events VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
_METRIC = "INSERT INTO metrics VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
_BIRTH = (
    "UPDATE devices SET online=1, session=?, profile=COALESCE(NULLIF(?, ''), profile),"
    " grp=COALESCE(?, grp), version=COALESCE(?, version), model=COALESCE(?, model),"
    " slot=COALESCE(?, slot), health=COALESCE(?, health) WHERE id=?"
)
_DEATH = "UPDATE devices SET online=0 WHERE id=? AND session=?"
_STATE = (
    "UPDATE devices SET version=COALESCE(?, version), model=COALESCE(?, model), slot=COALESCE(?, slot),"
    " health=COALESCE(?, health), profile=COALESCE(?, profile), grp=COALESCE(?, grp), outbox_dropped=?,"
    " outbox_pending=?, state_epoch=?, state_seq=?, state_received=? WHERE id=?"
)
#: rows per multi-row INSERT on PostgreSQL (powers of two below it: few distinct statements)
_PG_CHUNK = 256
#: ids per ``IN (...)`` list
_IN_CHUNK = 500


def store_new(db: Conn, envelopes: Sequence[wire.Envelope], now: float) -> list[wire.Envelope]:
    """Insert the sequenced ones into ``messages``; returns the envelopes that were not stored
    before (unsequenced birth/death always count), in their order."""
    rows: list[tuple[Any, ...]] = []
    slot: list[int] = []  # per envelope: its row, -1 a repeat within the batch, -2 unsequenced
    seen: set[tuple[str, str, int]] = set()
    for env in envelopes:
        if env.seq <= 0:
            slot.append(-2)
            continue
        key = (env.device, env.epoch, env.seq)
        if key in seen:
            slot.append(-1)
            continue
        seen.add(key)
        slot.append(len(rows))
        rows.append((env.device, env.epoch, env.seq, env.kind, env.ts, now, encode(env.body)))
    fresh = _insert_new(db, rows)
    return [env for env, i in zip(envelopes, slot, strict=True) if i == -2 or (i >= 0 and fresh[i])]


def _insert_new(db: Conn, rows: list[tuple[Any, ...]]) -> list[bool]:
    """Insert ``rows`` into ``messages`` where their key is new; True for each one inserted."""
    if not rows:
        return []
    if isinstance(db, PgConn):
        got: set[tuple[Any, ...]] = set()
        in_key_order = sorted(rows, key=_key)  # replicas inserting the same keys take them in one order
        i = 0
        for n in _chunks(len(rows), _PG_CHUNK):
            part = in_key_order[i : i + n]
            i += n
            sql = f"{_INSERT}{','.join([_ROW] * n)} ON CONFLICT DO NOTHING RETURNING device, epoch, seq"
            got.update((r[0], r[1], r[2]) for r in db.execute(sql, [v for row in part for v in row]))
        return [row[:3] in got for row in rows]
    db.execute("SAVEPOINT new_messages")
    try:
        db.executemany(_INSERT + _ROW, rows)
    except sqlite3.IntegrityError:  # a key is already stored (a redelivery): find which, row by row
        db.execute("ROLLBACK TO new_messages")
        db.execute("RELEASE new_messages")
        return [db.execute(f"{_INSERT}{_ROW} ON CONFLICT DO NOTHING", row).rowcount == 1 for row in rows]
    db.execute("RELEASE new_messages")
    return [True] * len(rows)


def _key(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return row[:3]


def _chunks(n: int, biggest: int) -> list[int]:
    """``n`` as a sum of powers of two up to ``biggest``, largest first."""
    out, c = [], biggest
    while n:
        while c > n:
            c //= 2
        out.append(c)
        n -= c
    return out


def apply_stored(db: Conn, stored: Sequence[wire.Envelope], now: float) -> None:
    """What stored messages change besides ``messages``: the registry rows, events, metrics and
    device state. ``stored`` is ordered by device, each device's messages in batch order. Bodies
    are re-read as their typed records, so only checked values reach SQL."""
    devices = sorted({env.device for env in stored})
    db.executemany(_DEVICE, [(d, now, now) for d in devices])
    events: list[tuple[Any, ...]] = []
    metrics: list[tuple[Any, ...]] = []
    state: dict[str, list[tuple[wire.Envelope, Any]]] = {}
    for env in stored:
        b = env.typed_body()
        if isinstance(b, wire.Event):
            events.append((env.device, env.epoch, env.seq, env.ts, now, b.name, encode(b.fields)))
        elif isinstance(b, wire.Metrics):
            metrics.append(_metric_row(env, b, now))
        elif isinstance(b, (wire.Birth, wire.Death, wire.Heartbeat)):
            state.setdefault(env.device, []).append((env, b))
    if events:
        db.executemany(_EVENT, events)
    if metrics:
        db.executemany(_METRIC, metrics)
    if state:
        _apply_state(db, state, now)


def _metric_row(env: wire.Envelope, b: wire.Metrics, now: float) -> tuple[Any, ...]:
    return (
        env.device,
        env.epoch,
        env.seq,
        env.ts,
        now,
        b.version,
        b.model,
        b.count,
        b.errors or 0,
        b.p50_latency_ms,
        b.p95_latency_ms,
        b.tokens_per_second,
        b.mean_logprob,
        b.prompt_tokens_mean,
        b.prompt_tokens_max,
        b.completion_tokens or 0,
    )


def _apply_state(db: Conn, ops: dict[str, list[tuple[wire.Envelope, Any]]], now: float) -> None:
    with_heartbeats = [d for d, items in ops.items() if any(isinstance(b, wire.Heartbeat) for _, b in items)]
    current: dict[str, tuple[Any, Any, Any]] = {}
    for i in range(0, len(with_heartbeats), _IN_CHUNK):
        part = with_heartbeats[i : i + _IN_CHUNK]
        q = f"SELECT id, state_epoch, state_seq, state_received FROM devices WHERE id IN ({','.join('?' * len(part))})"
        current.update({r[0]: (r[1], r[2], r[3]) for r in db.execute(q, part)})
    for device in sorted(ops):
        fold = _Fold(device, current.get(device, (None, 0, 0.0)), now)
        for env, b in ops[device]:
            if isinstance(b, wire.Heartbeat):
                fold.heartbeat(env, b)
                continue
            fold.flush(db)  # a birth or death lands between the heartbeats around it
            if isinstance(b, wire.Birth):
                db.execute(_BIRTH, (b.session, b.profile, b.group, b.version, b.model, b.slot, b.health, device))
            else:
                db.execute(_DEATH, (device, b.session))
        fold.flush(db)


class _Fold:
    """Consecutive heartbeats of one device as the one ``UPDATE`` that applying each in turn would
    amount to: each applies when newer (decision 0008); an applied one sets the values it carries
    (``None``, or an empty profile, keeps the previous one), the outbox figures and the state."""

    _KEPT = ("version", "model", "slot", "health", "profile", "group")

    def __init__(self, device: str, state: tuple[Any, Any, Any], now: float) -> None:
        self.device = device
        self.epoch, self.seq, self.received = state
        self.now = now
        self.values: dict[str, Any] | None = None

    def heartbeat(self, env: wire.Envelope, b: wire.Heartbeat) -> None:
        e, s = env.epoch, env.seq
        newer = (
            self.epoch is None or (self.epoch == e and self.seq < s) or (self.epoch != e and self.received <= self.now)
        )
        if not newer:
            return
        self.epoch, self.seq, self.received = e, s, self.now
        values = self.values if self.values is not None else dict.fromkeys(self._KEPT)
        for k in self._KEPT:
            v = getattr(b, k)
            if v is not None and not (k == "profile" and v == ""):
                values[k] = v
        values["outbox_dropped"] = b.outbox_dropped or 0
        values["outbox_pending"] = b.outbox_pending or 0
        self.values = values

    def flush(self, db: Conn) -> None:
        v = self.values
        if v is None:
            return
        db.execute(
            _STATE,
            (
                v["version"],
                v["model"],
                v["slot"],
                v["health"],
                v["profile"],
                v["group"],
                v["outbox_dropped"],
                v["outbox_pending"],
                self.epoch,
                self.seq,
                self.received,
                self.device,
            ),
        )
        self.values = None

"""The store's telemetry half: ingest (deduplicated on device + epoch + seq), the quarantine of
refused messages, the device registry, events and metrics queries."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from edgellm import telemetry as wire
from server.store import batch
from server.store.dialect import Conn, Dialect
from server.store.rows import DeviceRow, EventRow, MetricSummary, QuarantineRow, SeriesPoint

#: bounds of what a refused message may occupy: its first bytes, a short reason, a few rows
QUARANTINE_PAYLOAD_BYTES = 4096
QUARANTINE_KEEP = 10_000
_TEXT_MAX = 500

_DEVICE_COLUMNS = (
    "id, profile, grp, version, model, slot, health, online, session, first_seen, last_seen, "
    "outbox_dropped, outbox_pending"
)
_BUMP = "INSERT INTO counters VALUES (?,?) ON CONFLICT(name) DO UPDATE SET value=counters.value+excluded.value"


def _weighted(col: str) -> str:
    return f"SUM({col}*count)/NULLIF(SUM(CASE WHEN {col} IS NULL THEN 0 ELSE count END),0)"


class TelemetryTables:
    """Mixed into :class:`server.store.Store` (which provides ``db`` and ``tx``)."""

    db: Conn
    dialect: Dialect

    def tx(self) -> Any:  # provided by Store
        raise NotImplementedError

    # ------------------------------------------------------------------ writing

    def ingest(self, envelopes: Iterable[wire.Envelope], received: float | None = None) -> dict[str, int]:
        """Store a batch of validated envelopes in one transaction, a few bulk statements per
        batch (:mod:`server.store.batch`). Returns {"stored": n, "duplicates": n}."""
        now = received if received is not None else time.time()
        # One device's messages keep their order; devices go in id order, so two replicas writing
        # batches at once take row locks in the same order (no deadlock between them).
        ordered = sorted(envelopes, key=_device_of)
        with self.tx() as db:
            stored = batch.store_new(db, ordered, now)
            if stored:
                batch.apply_stored(db, stored, now)
            dups = len(ordered) - len(stored)
            if ordered:
                db.executemany(_BUMP, [("stored", len(stored)), ("duplicates", dups)])
        return {"stored": len(stored), "duplicates": dups}

    def quarantine(self, refused: Sequence[tuple[str, bytes, str, str]], received: float | None = None) -> None:
        """Set refused messages aside: ``(topic, payload, reason, detail)`` each. The payload is
        kept up to :data:`QUARANTINE_PAYLOAD_BYTES`, the newest :data:`QUARANTINE_KEEP` rows stay,
        and each adds to the ``malformed_<reason>`` counter."""
        if not refused:
            return
        now = received if received is not None else time.time()
        by_reason: dict[str, int] = {}
        with self.tx() as db:
            for topic, payload, reason, detail in refused:
                db.execute(
                    "INSERT INTO quarantine (received, topic, reason, detail, size, payload) VALUES (?,?,?,?,?,?)",
                    (
                        now,
                        topic[:_TEXT_MAX],
                        reason,
                        detail[:_TEXT_MAX],
                        len(payload),
                        bytes(payload[:QUARANTINE_PAYLOAD_BYTES]),
                    ),
                )
                by_reason[f"malformed_{reason}"] = by_reason.get(f"malformed_{reason}", 0) + 1
            db.executemany(_BUMP, [*by_reason.items(), ("quarantined", len(refused))])
            db.execute("DELETE FROM quarantine WHERE id <= (SELECT MAX(id) FROM quarantine) - ?", (QUARANTINE_KEEP,))

    def prune(self, older_than_s: float) -> int:
        """Forget telemetry received more than ``older_than_s`` ago (messages, metrics, events,
        quarantine). Deduplication only covers what is kept: keep longer than any outbox could
        hold a message."""
        cutoff = time.time() - older_than_s
        n = 0
        with self.tx() as db:
            for table in ("messages", "metrics", "events", "quarantine"):
                n += db.execute(f"DELETE FROM {table} WHERE received < ?", (cutoff,)).rowcount
        return n

    def count(self, name: str, n: int = 1) -> None:
        if n:
            self.db.execute(_BUMP, (name, n))

    def counters(self) -> dict[str, int]:
        return {r["name"]: r["value"] for r in self.db.execute("SELECT name, value FROM counters ORDER BY name")}

    # ------------------------------------------------------------------ reading

    def devices(self, group: str | None = None, stale_after_s: float = 180.0) -> list[DeviceRow]:
        """Device registry rows, by id (optionally one group)."""
        q, args = f"SELECT {_DEVICE_COLUMNS} FROM devices", []
        if group is not None:
            q, args = q + " WHERE grp=?", [group]
        return [_device(r, stale_after_s) for r in self.db.execute(q + " ORDER BY id", args)]

    def device(self, device_id: str, stale_after_s: float = 180.0) -> DeviceRow | None:
        r = self.db.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE id=?", (device_id,)).fetchone()
        return _device(r, stale_after_s) if r is not None else None

    def message_seqs(self, device: str) -> list[int]:
        """Sequence numbers stored for a device (all epochs), in order."""
        return [r[0] for r in self.db.execute("SELECT seq FROM messages WHERE device=? ORDER BY epoch, seq", (device,))]

    def message_count(self, device: str | None = None, kind: str | None = None) -> int:
        q, args = "SELECT COUNT(*) FROM messages WHERE 1=1", list[Any]()
        if device:
            q, args = q + " AND device=?", [*args, device]
        if kind:
            q, args = q + " AND kind=?", [*args, kind]
        return self.db.execute(q, args).fetchone()[0]

    def message_bodies(self, device: str, kind: str) -> list[dict[str, Any]]:
        """Bodies of one device's stored messages of one kind (e.g. command replies), in order."""
        return [
            json.loads(r[0])
            for r in self.db.execute(
                "SELECT body FROM messages WHERE device=? AND kind=? ORDER BY epoch, seq", (device, kind)
            )
        ]

    def events(self, device: str | None = None, name: str | None = None, since: float = 0.0) -> list[EventRow]:
        return self.events_of(None if device is None else [device], None if name is None else [name], since)

    def events_of(
        self, devices: Sequence[str] | None, names: Iterable[str] | None, since: float = 0.0
    ) -> list[EventRow]:
        """Events received since ``since`` from ``devices`` (all if None) named one of ``names``
        (all if None), in the order they were received."""
        q = "SELECT device, seq, ts, received, name, fields FROM events WHERE received>=?"
        args: list[Any] = [since]
        if devices is not None:
            if not devices:
                return []
            q += f" AND device IN ({','.join('?' * len(devices))})"
            args += list(devices)
        if names is not None:
            wanted = [str(n) for n in names]
            q += f" AND name IN ({','.join('?' * len(wanted))})"
            args += wanted
        return [
            EventRow(r["device"], r["seq"], r["ts"], r["received"], r["name"], json.loads(r["fields"]))
            for r in self.db.execute(q + " ORDER BY received, device, seq", args)
        ]

    def metric_summary(self, devices: Sequence[str], version: str | None, since: float) -> MetricSummary:
        """Aggregate of the metrics received since ``since`` from ``devices`` running ``version``."""
        if not devices:
            return MetricSummary()
        q = (
            f"SELECT SUM(count) n, SUM(errors) e, {_weighted('p50')} p50, {_weighted('p95')} p95,"
            f" {_weighted('tps')} tps, {_weighted('mean_logprob')} lp, MAX(p95) p95max FROM metrics"
            f" WHERE device IN ({','.join('?' * len(devices))}) AND received>=?"
        )
        args: list[Any] = [*devices, since]
        if version is not None:
            q, args = q + " AND version=?", [*args, version]
        r = self.db.execute(q, args).fetchone()
        n, e = r["n"] or 0, r["e"] or 0
        return MetricSummary(
            count=n,
            errors=e,
            error_rate=e / n if n else None,
            p50_latency_ms=r["p50"],
            p95_latency_ms=r["p95"],
            tokens_per_second=r["tps"],
            mean_logprob=r["lp"],
            max_p95_latency_ms=r["p95max"],
        )

    def series(
        self, by: str = "version", since: float = 0.0, bucket_s: float = 60.0, device: str | None = None
    ) -> list[SeriesPoint]:
        """Time-bucketed metrics for charts, keyed by version or device."""
        key = "device" if by == "device" else "COALESCE(version, '?')"
        q = (
            f"SELECT {key} k, {self.dialect.floor.format('received/?')}*? t, SUM(count) n, SUM(errors) e, {_weighted('p95')} p95,"
            f" {_weighted('p50')} p50, {_weighted('tps')} tps, {_weighted('mean_logprob')} lp"
            " FROM metrics WHERE received>=?"
        )
        args: list[Any] = [bucket_s, bucket_s, since]
        if device:
            q, args = q + " AND device=?", [*args, device]
        return [
            SeriesPoint(
                r["k"],
                r["t"],
                r["n"],
                r["e"],
                r["p95"],
                r["p50"],
                r["tps"],
                r["lp"],
                (r["e"] / r["n"]) if r["n"] else None,
            )
            for r in self.db.execute(q + " GROUP BY k, t ORDER BY k, t", args)
        ]

    def quarantined(self, limit: int = 100) -> list[QuarantineRow]:
        """The newest refused messages first."""
        return [
            QuarantineRow(r["id"], r["received"], r["topic"], r["reason"], r["detail"], r["size"], r["payload"])
            for r in self.db.execute("SELECT * FROM quarantine ORDER BY id DESC LIMIT ?", (limit,))
        ]

    def quarantine_size(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]


def _device(r: Any, stale_after_s: float) -> DeviceRow:
    online = bool(r["online"])
    return DeviceRow(
        id=r["id"],
        profile=r["profile"],
        group=r["grp"],
        version=r["version"],
        model=r["model"],
        slot=r["slot"],
        health=r["health"],
        online=online,
        session=r["session"],
        first_seen=r["first_seen"],
        last_seen=r["last_seen"],
        outbox_dropped=r["outbox_dropped"],
        outbox_pending=r["outbox_pending"],
        stale=online and (r["last_seen"] or 0) < time.time() - stale_after_s,
    )


def _device_of(env: wire.Envelope) -> str:
    return env.device

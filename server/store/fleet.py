"""The store's fleet half: rollout plans (stages, evidence, timeouts, what the group ran
before, final counts), yanked versions, the history of assignments, operator commands waiting
to be sent to devices, and what devices said about their updates."""

from __future__ import annotations

import json
import time
from typing import Any

from edgellm import telemetry as wire

FLEET_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollout_plans (
    rollout TEXT PRIMARY KEY, stages TEXT NOT NULL, stage {INT} NOT NULL DEFAULT 0, min_samples {INT} NOT NULL,
    device_timeout_s {REAL} NOT NULL, no_gate {INT} NOT NULL DEFAULT 0, previous TEXT, final TEXT,
    stalled TEXT, release TEXT
);
CREATE TABLE IF NOT EXISTS yanked (
    model TEXT NOT NULL, version TEXT NOT NULL, ts {REAL} NOT NULL, reason TEXT, PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS assignment_log (
    serial {INT} NOT NULL, scope TEXT NOT NULL, subject TEXT NOT NULL, model TEXT, version TEXT,
    rollout TEXT, ts {REAL} NOT NULL
);
CREATE INDEX IF NOT EXISTS assignment_log_subject ON assignment_log (scope, subject, serial);
CREATE TABLE IF NOT EXISTS device_commands (
    id TEXT PRIMARY KEY, device TEXT NOT NULL, name TEXT NOT NULL, args TEXT NOT NULL, created {REAL} NOT NULL,
    sent {REAL}
);
"""


def migrate_fleet(db: Any, dialect: Any) -> None:
    """Create the fleet tables that are missing (SQLite or PostgreSQL types)."""
    db.executescript(dialect.schema(FLEET_SCHEMA))


_UPDATE_EVENTS = tuple(str(e) for e in wire.EventName if str(e).startswith("update."))
_FAILURES = {str(e) for e in wire.UPDATE_FAILURES}
_MAX_REJECTED = 20


def _text(v: Any, n: int = 300) -> str | None:
    return None if v is None else str(v)[:n]


class FleetTables:
    """Mixed into :class:`server.store.Store` (which provides ``db`` and ``tx``)."""

    db: Any

    def tx(self) -> Any:  # provided by Store
        raise NotImplementedError

    # ------------------------------------------------------------------ rollout plans

    def create_plan(
        self,
        rollout: str,
        *,
        stages: list[float],
        min_samples: int,
        device_timeout_s: float,
        no_gate: bool,
        release: dict[str, Any] | None = None,
    ) -> None:
        """``release``: ``{"prefer": "adapter"|"full", "adapter": [name, version] | None}``."""
        self.db.execute(
            "INSERT INTO rollout_plans (rollout, stages, min_samples, device_timeout_s, no_gate, release)"
            " VALUES (?,?,?,?,?,?)",
            (rollout, json.dumps(stages), min_samples, device_timeout_s, int(no_gate), json.dumps(release or {})),
        )

    def plan(self, rollout: str) -> dict[str, Any]:
        """The plan of a rollout (a rollout made before plans existed gets the old defaults)."""
        r = self.db.execute("SELECT * FROM rollout_plans WHERE rollout=?", (rollout,)).fetchone()
        if r is None:
            return {
                "stages": [100.0],
                "stage": 0,
                "min_samples": None,
                "device_timeout_s": None,
                "no_gate": False,
                "previous": None,
                "final": None,
                "stalled": None,
                "release": {},
            }
        return {
            "stages": json.loads(r["stages"]),
            "stage": r["stage"],
            "min_samples": r["min_samples"],
            "device_timeout_s": r["device_timeout_s"],
            "no_gate": bool(r["no_gate"]),
            "previous": json.loads(r["previous"]) if r["previous"] else None,
            "final": json.loads(r["final"]) if r["final"] else None,
            "stalled": r["stalled"],
            "release": json.loads(r["release"]) if r["release"] else {},
        }

    def update_plan(self, rollout: str, **fields: Any) -> None:
        """Set ``stage`` (int), ``previous``/``final`` (JSON-able) or ``stalled`` (text or None)."""
        allowed = {"stage", "previous", "final", "stalled"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"update_plan takes {sorted(allowed)}")
        cols = ", ".join(f"{k}=?" for k in fields)
        vals = [json.dumps(v) if k in ("previous", "final") and v is not None else v for k, v in fields.items()]
        self.db.execute(f"UPDATE rollout_plans SET {cols} WHERE rollout=?", (*vals, rollout))

    # ------------------------------------------------------------------ yanked versions

    def yank(self, model: str, version: str, reason: str | None = None) -> bool:
        """Withdraw ``model`` ``version``; False if it was already."""
        cur = self.db.execute(
            "INSERT INTO yanked VALUES (?,?,?,?) ON CONFLICT (model, version) DO NOTHING",
            (model, version, time.time(), reason),
        )
        return cur.rowcount == 1

    def is_yanked(self, model: str | None, version: str | None) -> bool:
        return (
            self.db.execute("SELECT 1 FROM yanked WHERE model=? AND version=?", (model, version)).fetchone() is not None
        )

    def yanked(self) -> list[dict[str, Any]]:
        return [
            {"model": r["model"], "version": r["version"], "ts": r["ts"], "reason": r["reason"]}
            for r in self.db.execute("SELECT model, version, ts, reason FROM yanked ORDER BY ts")
        ]

    # ------------------------------------------------------------------ assignment history

    def log_assignment(
        self, serial: int, scope: str, subject: str, model: str | None, version: str | None, rollout: str | None
    ) -> None:
        self.db.execute(
            "INSERT INTO assignment_log VALUES (?,?,?,?,?,?,?)",
            (serial, scope, subject, model, version, rollout, time.time()),
        )

    def assignment_history(self, scope: str, subject: str) -> list[dict[str, Any]]:
        """Every version assigned at ``scope``/``subject``, newest first."""
        return [
            {"serial": r["serial"], "model": r["model"], "version": r["version"], "rollout": r["rollout"]}
            for r in self.db.execute(
                "SELECT serial, model, version, rollout FROM assignment_log"
                " WHERE scope=? AND subject=? ORDER BY serial DESC",
                (scope, subject),
            )
        ]

    # ------------------------------------------------------------------ device commands

    def queue_command(self, cid: str, device: str, name: str, args: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO device_commands VALUES (?,?,?,?,?,NULL)", (cid, device, name, json.dumps(args), time.time())
        )

    def pending_commands(self, max_age_s: float = 300.0) -> list[dict[str, Any]]:
        """Commands not sent yet (older ones are dropped: their caller gave up)."""
        self.db.execute("DELETE FROM device_commands WHERE sent IS NULL AND created < ?", (time.time() - max_age_s,))
        return [
            {"id": r["id"], "device": r["device"], "name": r["name"], "args": json.loads(r["args"])}
            for r in self.db.execute(
                "SELECT id, device, name, args FROM device_commands WHERE sent IS NULL ORDER BY created"
            )
        ]

    def command_sent(self, cid: str) -> None:
        self.db.execute("UPDATE device_commands SET sent=? WHERE id=?", (time.time(), cid))

    def command_reply(self, device: str, cid: str) -> dict[str, Any] | None:
        for body in reversed(self.message_bodies(device, "reply")):  # type: ignore[attr-defined]  # a mixin of Store
            if isinstance(body, dict) and body.get("id") == cid:
                return body
        return None

    # ------------------------------------------------------------------ what devices said

    def set_device_group(self, device: str, group: str) -> bool:
        return self.db.execute("UPDATE devices SET grp=? WHERE id=?", (group, device)).rowcount == 1

    def update_reports(self) -> dict[str, dict[str, Any]]:
        """Per device, from its newest update event: ``last_error`` (None once an update
        succeeded since), ``rejected`` (the versions it refuses), ``last_event``."""
        q = (
            f"SELECT e.device, e.name, e.fields, e.received FROM events e JOIN (SELECT device, MAX(received) m"
            f" FROM events WHERE name IN ({','.join('?' * len(_UPDATE_EVENTS))}) GROUP BY device) x"
            " ON e.device = x.device AND e.received = x.m WHERE e.name IN"
            f" ({','.join('?' * len(_UPDATE_EVENTS))})"
        )
        out: dict[str, dict[str, Any]] = {}
        for r in self.db.execute(q, (*_UPDATE_EVENTS, *_UPDATE_EVENTS)):
            f = json.loads(r["fields"])
            rejected = f.get("rejected")
            rejected = [str(v)[:64] for v in rejected[:_MAX_REJECTED]] if isinstance(rejected, list) else None
            error = None
            if r["name"] in _FAILURES:
                error = _text(f.get("reason") or f.get("error") or r["name"])
                if f.get("version"):
                    error = f"{f['version']}: {error}"
            out[r["device"]] = {
                "last_error": error,
                "rejected": rejected,
                "last_event": r["name"],
                "last_event_at": r["received"],
            }
        return out

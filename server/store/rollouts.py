"""The store's rollout half: rollouts, the devices each one touches, and their history."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from server.store.dialect import Conn, Dialect
from server.store.rows import Choice, LogEntry, RolloutDeviceRow, RolloutRow


def _rollout(r: Any) -> RolloutRow:
    return RolloutRow(
        id=r["id"],
        model=r["model"],
        version=r["version"],
        group=r["grp"],
        canary_pct=r["canary_pct"],
        gate=r["gate"],
        bake_s=r["bake_s"],
        state=r["state"],
        reason=r["reason"],
        paused=bool(r["paused"]),
        created=r["created"],
        updated=r["updated"],
        phase_started=r["phase_started"],
        request=r["request"],
    )


class RolloutTables:
    """Mixed into :class:`server.store.Store` (which provides ``db`` and ``tx``)."""

    db: Conn
    dialect: Dialect

    def tx(self) -> Any:  # provided by Store
        raise NotImplementedError

    def create_rollout(
        self, rid: str, *, model: str, version: str, group: str, canary_pct: float, gate: str, bake_s: float, state: str
    ) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO rollouts (id, model, version, grp, canary_pct, gate, bake_s, state, created, updated)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)",
            (rid, model, version, group, canary_pct, gate, bake_s, str(state), now, now),
        )

    def rollout(self, rollout_id: str) -> RolloutRow | None:
        r = self.db.execute("SELECT * FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
        return _rollout(r) if r is not None else None

    def rollouts(
        self, states: Iterable[str] | None = None, group: str | None = None, newest_first: bool = False
    ) -> list[RolloutRow]:
        """Rollouts (optionally only in ``states`` and/or one group), oldest first by default."""
        q, args = "SELECT * FROM rollouts WHERE 1=1", []
        if states is not None:
            states = [str(s) for s in states]
            q += f" AND state IN ({','.join('?' * len(states))})"
            args += states
        if group is not None:
            q, args = q + " AND grp=?", [*args, group]
        q += " ORDER BY created DESC" if newest_first else " ORDER BY created"
        return [_rollout(r) for r in self.db.execute(q, args)]

    def rollout_counts(self) -> dict[str, int]:
        """Number of rollouts in each state."""
        return {r["state"]: r["n"] for r in self.db.execute("SELECT state, COUNT(*) n FROM rollouts GROUP BY state")}

    def set_rollout_state(
        self,
        rollout_id: str,
        state: str,
        *,
        reason: str | None = None,
        phase_started: bool = True,
        expect: RolloutRow | None = None,
    ) -> bool:
        """Move a rollout to ``state`` (``reason`` kept unless given; the phase clock restarts
        unless ``phase_started`` is false). With ``expect``, only if the rollout is still in that
        row's state and phase (compare-and-set: of two drivers acting on the same reading, one
        moves it). Returns whether it moved."""
        now = time.time()
        q = (
            "UPDATE rollouts SET state=?, updated=?, reason=COALESCE(?, reason),"
            " phase_started=CASE WHEN ? THEN ? ELSE phase_started END WHERE id=?"
        )
        args: list[Any] = [str(state), now, reason, phase_started, now, rollout_id]
        if expect is not None:
            q += " AND state=? AND COALESCE(phase_started, -1.0)=COALESCE(?, -1.0)"
            args += [expect.state, expect.phase_started]
        return self.db.execute(q, args).rowcount == 1

    def set_rollout_paused(self, rollout_id: str, paused: bool, *, restart_phase_in: str | None = None) -> None:
        """Pause or resume; resuming restarts the phase clock when the rollout is in ``restart_phase_in``."""
        now = time.time()
        self.db.execute(
            "UPDATE rollouts SET paused=?, updated=?, phase_started=CASE WHEN state=? THEN ?"
            " ELSE phase_started END WHERE id=?",
            (int(paused), now, restart_phase_in, now, rollout_id),
        )

    def set_rollout_request(self, rollout_id: str, request: str | None) -> None:
        """Record (or clear) an operator request the driver acts upon."""
        self.db.execute("UPDATE rollouts SET request=?, updated=? WHERE id=?", (request, time.time(), rollout_id))

    def assign_rollout_devices(
        self, rollout_id: str, devices: Sequence[tuple[str, str, str | None, str | None]]
    ) -> None:
        """``(device, phase, previous_version, previous_model)`` for every device of the rollout."""
        with self.tx() as db:
            db.executemany(
                "INSERT INTO rollout_devices VALUES (?,?,?,?,?) ON CONFLICT(rollout, device) DO UPDATE SET"
                " phase=excluded.phase, previous_version=excluded.previous_version,"
                " previous_model=excluded.previous_model",
                [(rollout_id, *d) for d in devices],
            )

    def rollout_devices(self, rollout_id: str, phase: str | None = None) -> list[RolloutDeviceRow]:
        """A rollout's devices (optionally one phase) with the version each reports now, by id."""
        q = (
            "SELECT rd.device, rd.phase, rd.previous_version, rd.previous_model, d.version, d.online"
            " FROM rollout_devices rd LEFT JOIN devices d ON d.id = rd.device WHERE rd.rollout=?"
        )
        args: list[Any] = [rollout_id]
        if phase is not None:
            q, args = q + " AND rd.phase=?", [*args, str(phase)]
        return [
            RolloutDeviceRow(
                r["device"], r["phase"], r["previous_version"], r["previous_model"], r["version"], bool(r["online"])
            )
            for r in self.db.execute(q + " ORDER BY rd.device", args)
        ]

    def set_rollout_choices(self, rollout_id: str, choices: dict[str, Choice]) -> None:
        """Each device's part of the release, by device id (:mod:`server.release`)."""
        with self.tx() as db:
            db.executemany(
                "INSERT INTO rollout_wire VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(rollout, device) DO UPDATE SET"
                " kind=excluded.kind, model=excluded.model, version=excluded.version, target=excluded.target,"
                " bytes=excluded.bytes, adapter=excluded.adapter, adapter_version=excluded.adapter_version",
                [
                    (rollout_id, dev, c.kind, c.model, c.version, c.target, c.bytes, c.adapter, c.adapter_version)
                    for dev, c in choices.items()
                ],
            )

    def rollout_choices(self, rollout_id: str) -> dict[str, Choice]:
        """The choices :meth:`set_rollout_choices` recorded (none for a rollout made before them)."""
        return {
            r["device"]: Choice(
                r["kind"], r["model"], r["version"], r["target"], r["bytes"], r["adapter"], r["adapter_version"]
            )
            for r in self.db.execute("SELECT * FROM rollout_wire WHERE rollout=?", (rollout_id,))
        }

    def log_rollout(self, rollout_id: str, state: str, message: str) -> None:
        self.db.execute(
            "INSERT INTO rollout_log (rollout, ts, state, message) VALUES (?,?,?,?)",
            (rollout_id, time.time(), str(state), message),
        )

    def rollout_log(self, rollout_id: str) -> list[LogEntry]:
        return [
            LogEntry(r["ts"], r["state"], r["message"])
            for r in self.db.execute(
                f"SELECT ts, state, message FROM rollout_log WHERE rollout=? ORDER BY ts, {self.dialect.insertion_order}",
                (rollout_id,),
            )
        ]

"""Federated runs in the server's store (same SQLite file, own tables), and the privacy ledger.

States of a run (the server's driver moves them; the ServerApp writes rounds and results)::

    pending ──► inviting ──► running ──► aggregated ──► publishing ──► published
        └──────────┴────────────┴─────────────┴──────────────┴──► failed (reason)

Tables: ``fl_runs`` (one row per run, its settings and state), ``fl_devices`` (per run and
device: invited / accepted / declined / excluded / trained / rejected / lost, with the reason and
the sha256 of the data the device reports it trained on), ``fl_rounds`` (per round: train and
held-out losses, usable replies), ``fl_ledger`` (per device, run and round: the noise multiplier
it got and ε spent that round and accumulated), ``fl_log`` (history).
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from typing import Any

from edgellm.errors import EdgeLLMError
from edgellm.ids import ID_RULE, valid_id
from server.federated import privacy
from server.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS fl_runs (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, base_version TEXT NOT NULL, version TEXT NOT NULL,
    grp TEXT NOT NULL, settings TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, round INTEGER NOT NULL DEFAULT 0,
    flower_run TEXT, plan TEXT, result TEXT, rollout TEXT, created REAL NOT NULL, updated REAL NOT NULL, phase_started REAL
);
CREATE TABLE IF NOT EXISTS fl_devices (
    run TEXT NOT NULL, device TEXT NOT NULL, status TEXT NOT NULL, reason TEXT, data_sha256 TEXT,
    num_examples INTEGER, rounds INTEGER NOT NULL DEFAULT 0, command TEXT, updated REAL NOT NULL,
    PRIMARY KEY (run, device)
);
CREATE TABLE IF NOT EXISTS fl_rounds (
    run TEXT NOT NULL, round INTEGER NOT NULL, train_loss REAL, heldout_before REAL, heldout_after REAL,
    heldout_global REAL, replies INTEGER NOT NULL DEFAULT 0, rejected INTEGER NOT NULL DEFAULT 0,
    noise_std REAL NOT NULL DEFAULT 0, ts REAL NOT NULL, PRIMARY KEY (run, round)
);
CREATE TABLE IF NOT EXISTS fl_ledger (
    device TEXT NOT NULL, run TEXT NOT NULL, round INTEGER NOT NULL, noise_multiplier REAL NOT NULL,
    epsilon_round REAL NOT NULL, epsilon_total REAL NOT NULL, delta REAL NOT NULL, ts REAL NOT NULL,
    PRIMARY KEY (device, run, round)
);
CREATE TABLE IF NOT EXISTS fl_log (run TEXT NOT NULL, ts REAL NOT NULL, state TEXT NOT NULL, message TEXT NOT NULL);
"""

ACTIVE = ("pending", "inviting", "running", "aggregated", "publishing")
FINAL = ("published", "failed")


class FlError(EdgeLLMError):
    """A federated run request is invalid or the run cannot be found."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What ``fl start`` asked for. Bounded here: these reach devices and the build."""

    rounds: int = 3
    min_devices: int = 2
    local_steps: int = 20
    lr: float = 1e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    dp_noise: float = 0.0
    dp_clip: float = 0.0
    delta: float = privacy.DEFAULT_DELTA
    max_epsilon: float | None = None
    canary: str = "10%"
    gate: str = ""
    bake: str = "10m"
    rollout: bool = True
    seed: int = 0
    invite_timeout_s: float = 120.0
    round_timeout_s: float = 1800.0

    def check(self) -> RunSettings:
        def bad(what: str, hint: str) -> FlError:
            return FlError(f"{what}", hint=hint)

        if not 1 <= self.rounds <= 1000:
            raise bad(f"--rounds {self.rounds} must be 1..1000", "a few rounds are usual, e.g. --rounds 3")
        if not 1 <= self.min_devices <= 100_000:
            raise bad(f"--min-devices {self.min_devices} must be at least 1", "e.g. --min-devices 2")
        if not 1 <= self.local_steps <= 100_000:
            raise bad(f"--local-steps {self.local_steps} must be 1..100000", "e.g. --local-steps 20")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise bad(f"--lr {self.lr} must be in (0, 1]", "e.g. --lr 1e-3")
        if not 1 <= self.lora_rank <= 256:
            raise bad(f"--lora-rank {self.lora_rank} must be 1..256", "e.g. --lora-rank 8")
        if not (math.isfinite(self.dp_noise) and 0 <= self.dp_noise <= 1000):
            raise bad(f"--dp-noise {self.dp_noise} must be 0..1000", "e.g. --dp-noise 1.0 --dp-clip 1.0")
        if not (math.isfinite(self.dp_clip) and 0 <= self.dp_clip <= 1e6):
            raise bad(f"--dp-clip {self.dp_clip} must be a finite norm >= 0", "e.g. --dp-clip 1.0")
        if self.dp_noise > 0 and self.dp_clip <= 0:
            raise bad(
                "--dp-noise needs --dp-clip (the noise is scaled to the clipping norm)",
                "pass both, e.g. --dp-noise 1.0 --dp-clip 1.0",
            )
        if self.max_epsilon is not None and not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise bad(f"--max-epsilon {self.max_epsilon} must be a positive number", "e.g. --max-epsilon 8")
        if not 0 < self.delta < 1:
            raise bad(f"delta {self.delta} must be in (0, 1)", "the default 1e-5 is usual")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunSettings:
        d = json.loads(text)
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


class FlStore:
    """The federated tables on a :class:`server.store.Store` (shares its connection and file)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.db.executescript(SCHEMA)

    @property
    def db(self) -> Any:
        return self.store.db

    # -- runs

    def create(self, *, model: str, base_version: str, version: str, group: str, settings: RunSettings) -> str:
        for what, v in (("--model", model), ("--version", base_version), ("--publish", version), ("--group", group)):
            if not valid_id(v):
                raise FlError(f"{what} {v!r} is not valid", hint=f"use {ID_RULE}")
        if version == base_version:
            raise FlError(
                f"--publish {version} is the base version itself",
                hint="publish the fine-tuned model as a new version, e.g. --publish 0.2.0",
            )
        settings.check()
        busy = self.db.execute(
            f"SELECT id FROM fl_runs WHERE state IN ({','.join('?' * len(ACTIVE))})", ACTIVE
        ).fetchone()
        if busy:
            raise FlError(
                f"federated run {busy[0]} is still active (one run at a time)",
                hint=f"wait for it: `edgellm-server fl status {busy[0]} --wait`",
            )
        rid = f"fl-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        now = time.time()
        self.db.execute(
            "INSERT INTO fl_runs (id, model, base_version, version, grp, settings, state, created, updated,"
            " phase_started) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (rid, model, base_version, version, group, settings.to_json(), "pending", now, now, now),
        )
        self.log(
            rid,
            "pending",
            f"created: {model} {base_version} -> {version} on group {group}, "
            f"{settings.rounds} rounds, at least {settings.min_devices} devices",
        )
        return rid

    def run(self, run_id: str) -> dict[str, Any]:
        r = self.db.execute("SELECT * FROM fl_runs WHERE id=?", (run_id,)).fetchone()
        if r is None:
            raise FlError(f"no federated run {run_id!r}", hint="list runs with `edgellm-server fl status`")
        d = dict(r)
        d["settings"] = RunSettings.from_json(d["settings"])
        d["plan"] = json.loads(d["plan"]) if d["plan"] else {}
        d["result"] = json.loads(d["result"]) if d["result"] else None
        return d

    def runs(self, states: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        q, args = "SELECT id FROM fl_runs", tuple[str, ...]()
        if states:
            q += f" WHERE state IN ({','.join('?' * len(states))})"
            args = states
        return [self.run(r[0]) for r in self.db.execute(q + " ORDER BY created DESC", args)]

    def set_state(self, run_id: str, state: str, message: str, *, reason: str | None = None, **fields: Any) -> None:
        cols = {"state": state, "updated": time.time(), "phase_started": time.time(), **fields}
        if reason is not None:
            cols["reason"] = reason
        for k in ("plan", "result"):
            if k in cols and not isinstance(cols[k], (str, type(None))):
                cols[k] = json.dumps(cols[k], sort_keys=True)
        self.db.execute(f"UPDATE fl_runs SET {', '.join(f'{k}=?' for k in cols)} WHERE id=?", (*cols.values(), run_id))
        self.log(run_id, state, message)

    def fail(self, run_id: str, reason: str) -> None:
        self.set_state(run_id, "failed", f"failed: {reason}", reason=reason)

    def log(self, run_id: str, state: str, message: str) -> None:
        self.db.execute("INSERT INTO fl_log VALUES (?,?,?,?)", (run_id, time.time(), state, message[:2000]))

    # -- devices

    def set_device(self, run_id: str, device: str, status: str, reason: str = "", **fields: Any) -> None:
        cols = {"status": status, "reason": reason[:500], "updated": time.time(), **fields}
        self.db.execute(
            f"INSERT INTO fl_devices (run, device, {', '.join(cols)}) VALUES (?,?,{','.join('?' * len(cols))})"
            f" ON CONFLICT(run, device) DO UPDATE SET {', '.join(f'{k}=excluded.{k}' for k in cols)}",
            (run_id, device, *cols.values()),
        )

    def devices(self, run_id: str) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self.db.execute(
                "SELECT device, status, reason, data_sha256, num_examples, rounds, command FROM fl_devices"
                " WHERE run=? ORDER BY device",
                (run_id,),
            )
        ]

    # -- rounds and the ledger

    def record_round(self, run_id: str, rnd: int, **values: Any) -> None:
        cols = {"ts": time.time(), **values}
        self.db.execute(
            f"INSERT INTO fl_rounds (run, round, {', '.join(cols)}) VALUES (?,?,{','.join('?' * len(cols))})"
            f" ON CONFLICT(run, round) DO UPDATE SET {', '.join(f'{k}=excluded.{k}' for k in cols)}",
            (run_id, rnd, *cols.values()),
        )

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM fl_rounds WHERE run=? ORDER BY round", (run_id,))]

    def noise_multipliers(self, device: str) -> list[float]:
        return [
            r[0]
            for r in self.db.execute("SELECT noise_multiplier FROM fl_ledger WHERE device=? ORDER BY ts", (device,))
        ]

    def spend(self, run_id: str, rnd: int, multipliers: dict[str, float], delta: float) -> dict[str, float]:
        """Record one round's releases; returns each device's accumulated ε."""
        out = {}
        for device, z in multipliers.items():
            eps_round = privacy.epsilon([z], delta)
            eps_total = privacy.epsilon([*self.noise_multipliers(device), z], delta)
            self.db.execute(
                "INSERT OR REPLACE INTO fl_ledger VALUES (?,?,?,?,?,?,?,?)",
                (
                    device,
                    run_id,
                    rnd,
                    z if math.isfinite(z) else 0.0,
                    _num(eps_round),
                    _num(eps_total),
                    delta,
                    time.time(),
                ),
            )
            out[device] = eps_total
        return out

    def epsilon(self, device: str, delta: float = privacy.DEFAULT_DELTA) -> float:
        """The device's accumulated ε over every run (0 when it never took part)."""
        return privacy.epsilon(self.noise_multipliers(device), delta)

    def ledger(self, run_id: str | None = None, device: str | None = None) -> list[dict[str, Any]]:
        filters = {k: v for k, v in (("run", run_id), ("device", device)) if v}
        where = " AND ".join(f"{k}=?" for k in filters) or "1=1"
        rows = [
            dict(r)
            for r in self.db.execute(
                f"SELECT * FROM fl_ledger WHERE {where} ORDER BY device, ts", tuple(filters.values())
            )
        ]
        for r in rows:
            for k in ("epsilon_round", "epsilon_total"):
                r[k] = math.inf if r[k] < 0 else r[k]
        return rows


def _num(eps: float) -> float:
    """SQLite has no infinity literal through every driver: ∞ is stored as -1."""
    return -1.0 if not math.isfinite(eps) else eps


def status(fl: FlStore, run_id: str | None = None) -> list[dict[str, Any]]:
    """Runs (newest first, or one) for ``fl status``: state, round, devices with reasons, per-round
    losses, ε spent per device (this run's and accumulated), the published version and history."""
    rows = [fl.run(run_id)] if run_id else fl.runs()
    out = []
    for r in rows:
        s: RunSettings = r["settings"]
        devices = fl.devices(r["id"])
        spent: dict[str, dict[str, float]] = {}
        for e in fl.ledger(run_id=r["id"]):
            spent.setdefault(e["device"], {})["run"] = e["epsilon_total"]
        for d in devices:
            d["epsilon_total"] = (
                _json_num(fl.epsilon(d["device"], s.delta)) if fl.noise_multipliers(d["device"]) else 0.0
            )
        hist = [
            dict(h) for h in fl.db.execute("SELECT ts, state, message FROM fl_log WHERE run=? ORDER BY ts", (r["id"],))
        ]
        out.append(
            {
                "id": r["id"],
                "model": r["model"],
                "base_version": r["base_version"],
                "version": r["version"],
                "group": r["grp"],
                "state": r["state"],
                "reason": r["reason"],
                "round": r["round"],
                "rounds": s.rounds,
                "min_devices": s.min_devices,
                "settings": dataclasses.asdict(s),
                "flower_run": r["flower_run"],
                "created": r["created"],
                "updated": r["updated"],
                "participating": [d for d in devices if d["status"] in ("accepted", "trained")],
                "declining": [d for d in devices if d["status"] in ("declined", "excluded", "rejected", "lost")],
                "devices": devices,
                "rounds_detail": fl.rounds(r["id"]),
                "epsilon": {d["device"]: d["epsilon_total"] for d in devices if d["device"] in spent},
                "published_version": r["version"] if r["state"] == "published" else None,
                "rollout": r["rollout"],
                "plan": r["plan"],
                "result": r["result"],
                "history": hist,
            }
        )
    return out


def _json_num(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"

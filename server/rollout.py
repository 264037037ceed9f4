"""Canary rollouts that promote or roll back on their own.

State machine (one active rollout per group)::

    pending ──► canary ──► bake ──► full ──► completed
                  │          │
                  └──────────┴──► rolling_back ──► rolled_back      (gate broken / update failed)
    any active state ──► aborted (operator; canary devices go back to their previous version)
    ``paused`` is a flag: a paused rollout does not move; ``resume`` restarts the bake timer.

* **canary**: ``ceil(canary% × devices)`` devices of the group (online first, then by id) get a
  retained per-device desired state for the new version; the rollout waits until they all
  report it (heartbeat/birth) — an ``update_failed`` event from one of them, or
  ``update_timeout_s``, rolls back.
* **bake**: the gate is evaluated on the canary's metrics for the new version received since
  the bake started. A broken clause (with at least ``min_samples`` inferences) rolls back at
  once; at the end of ``bake_s`` the rollout needs ``min_samples`` to promote. A quiet canary
  (fewer samples) keeps baking, up to ``max_bake_factor × bake_s``, then rolls back: no
  promotion without evidence, but a low-traffic fleet gets time to produce it.
* **full**: the group's retained desired state becomes the new version and per-device pins
  in the group are cleared; the rollout completes when every device reports the version.
* **rollback**: each canary device gets a retained per-device desired state for the version it
  ran before; the reason is recorded and shown by ``rollout status`` and the dashboard.

The driver is the only writer of states other than the operator's requests
(pause/resume/abort are flags the driver acts on), so CLI processes can talk to a running
server through the shared store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import operator
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from edgellm import telemetry as wire
from edgellm.errors import EdgeLLMError

from server.store import Store

logger = logging.getLogger(__name__)

ACTIVE = ("pending", "canary", "bake", "full", "rolling_back")
FINAL = ("completed", "rolled_back", "aborted", "failed")
# Event names (both spellings: "update_failed" and the agent's "update.failed") that mean a device
# could not take the new version.
FAILURE_EVENTS = frozenset({
    "update_failed", "update.failed", "update_refused", "update.refused", "rolled_back", "update.rolled_back",
    "health_check_failed", "update.health_check_failed",
})
GATE_METRICS = ("p95_latency_ms", "p50_latency_ms", "error_rate", "mean_logprob", "tokens_per_second")
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt,
}
_CLAUSE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*(-?[0-9.eE+-]+)\s*$")


class RolloutError(EdgeLLMError):
    """A rollout request is invalid or cannot be carried out."""


@dataclasses.dataclass(frozen=True)
class Clause:
    metric: str
    op: str
    threshold: float

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclasses.dataclass(frozen=True)
class Gate:
    clauses: tuple[Clause, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> Gate:
        """``"p95_latency_ms<=800,error_rate<=0.01,mean_logprob>=-2.5"``"""
        if not text or not text.strip():
            return cls(())
        out = []
        for part in text.split(","):
            m = _CLAUSE.match(part)
            if not m:
                raise RolloutError(f"gate clause {part.strip()!r} is not METRIC OP NUMBER",
                                   hint="write e.g. --gate 'p95_latency_ms<=800,error_rate<=0.01,mean_logprob>=-2.5'")
            metric, op, num = m.groups()
            if metric not in GATE_METRICS:
                raise RolloutError(f"gate metric {metric!r} is unknown", hint=f"use one of {', '.join(GATE_METRICS)}")
            try:
                out.append(Clause(metric, op, float(num)))
            except ValueError:
                raise RolloutError(f"gate threshold {num!r} is not a number") from None
        return cls(tuple(out))

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.clauses)

    def broken(self, summary: dict[str, Any]) -> list[str]:
        """Reasons the summary breaks the gate (metrics absent from the summary are skipped)."""
        bad = []
        for c in self.clauses:
            v = summary.get(c.metric)
            if v is not None and not c.holds(float(v)):
                bad.append(f"{c.metric}={float(v):.4g} breaks {c}")
        return bad


def parse_percent(text: str | float) -> float:
    t = str(text).strip().rstrip("%")
    try:
        v = float(t)
    except ValueError:
        raise RolloutError(f"canary share {text!r} is not a percentage", hint="write e.g. --canary 10%") from None
    if not 0 < v <= 100:
        raise RolloutError(f"canary share {v}% must be in (0, 100]")
    return v


def parse_duration_s(text: str | float) -> float:
    t = str(text).strip().lower()
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    m = re.fullmatch(r"([0-9.]+)\s*(ms|s|m|h|d)?", t)
    if not m:
        raise RolloutError(f"duration {text!r} is not understood", hint="write e.g. 30s, 10m, 2h")
    return float(m.group(1)) * units[m.group(2) or "s"]


# --------------------------------------------------------------------------- store operations


def _row(store: Store, rollout_id: str) -> dict[str, Any]:
    r = store.db.execute("SELECT * FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
    if r is None:
        raise RolloutError(f"no rollout {rollout_id!r}", hint="list rollouts with `edgellm-server rollout status`")
    return dict(r)


def log(store: Store, rollout_id: str, state: str, message: str) -> None:
    store.db.execute("INSERT INTO rollout_log VALUES (?,?,?,?)", (rollout_id, time.time(), state, message))
    logger.info("rollout %s: %s: %s", rollout_id, state, message)


def start(store: Store, *, model: str, version: str, group: str = "default", canary: str | float = "10%",
          gate: str | None = None, bake: str | float = "10m") -> str:
    """Record a new rollout (state ``pending``); the server's driver carries it out."""
    if not wire.valid_id(model) or not wire.valid_id(version) or not wire.valid_id(group):
        raise RolloutError("model, version and group must be 1-128 characters of [A-Za-z0-9._-]")
    pct = parse_percent(canary)
    g = Gate.parse(gate)
    bake_s = parse_duration_s(bake)
    busy = store.db.execute(f"SELECT id FROM rollouts WHERE grp=? AND state IN ({','.join('?' * len(ACTIVE))})",
                            (group, *ACTIVE)).fetchone()
    if busy:
        raise RolloutError(f"group {group!r} already has an active rollout {busy[0]}",
                           hint=f"wait for it, or `edgellm-server rollout abort {busy[0]}`")
    rid = f"r-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    now = time.time()
    store.db.execute(
        "INSERT INTO rollouts (id, model, version, grp, canary_pct, gate, bake_s, state, created, updated, request)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (rid, model, version, group, pct, str(g), bake_s, "pending", now, now, None))
    log(store, rid, "pending", f"created: {model} {version} to group {group}, canary {pct:g}%, gate '{g}', bake {bake_s:g}s")
    return rid


def request(store: Store, rollout_id: str, action: str) -> None:
    """pause | resume | abort (acted upon by the driver; pause/resume take effect at once)."""
    r = _row(store, rollout_id)
    if r["state"] in FINAL:
        raise RolloutError(f"rollout {rollout_id} is already {r['state']}")
    now = time.time()
    if action == "pause":
        store.db.execute("UPDATE rollouts SET paused=1, updated=? WHERE id=?", (now, rollout_id))
    elif action == "resume":
        store.db.execute("UPDATE rollouts SET paused=0, updated=?, phase_started=CASE WHEN state='bake' THEN ? "
                         "ELSE phase_started END WHERE id=?", (now, now, rollout_id))
    elif action == "abort":
        store.db.execute("UPDATE rollouts SET request='abort', updated=? WHERE id=?", (now, rollout_id))
    else:
        raise RolloutError(f"unknown action {action!r}")
    log(store, rollout_id, r["state"], f"operator: {action}")


def status(store: Store, rollout_id: str | None = None) -> list[dict[str, Any]]:
    """Rollouts (newest first) with devices, progress and history."""
    if rollout_id:
        rows = [_row(store, rollout_id)]
    else:
        rows = [dict(r) for r in store.db.execute("SELECT * FROM rollouts ORDER BY created DESC")]
    out = []
    for r in rows:
        devs = [dict(d) for d in store.db.execute(
            "SELECT rd.device, rd.phase, rd.previous_version, d.version, d.online FROM rollout_devices rd "
            "LEFT JOIN devices d ON d.id = rd.device WHERE rd.rollout=? ORDER BY rd.device", (r["id"],))]
        on_new = sum(1 for d in devs if d["version"] == r["version"])
        hist = [dict(h) for h in store.db.execute(
            "SELECT ts, state, message FROM rollout_log WHERE rollout=? ORDER BY ts", (r["id"],))]
        out.append({
            "id": r["id"], "model": r["model"], "version": r["version"], "group": r["grp"],
            "canary_pct": r["canary_pct"], "gate": r["gate"], "bake_s": r["bake_s"], "state": r["state"],
            "paused": bool(r["paused"]), "reason": r["reason"], "created": r["created"], "updated": r["updated"],
            "devices": len(devs), "canary_devices": sum(1 for d in devs if d["phase"] == "canary"),
            "on_new_version": on_new, "device_states": devs, "history": hist,
        })
    return out


# --------------------------------------------------------------------------- the driver


class RolloutDriver:
    """Moves every active rollout one step per :meth:`tick`. ``publish(topic, payload, retain)``
    sends desired state (the server's MQTT connection)."""

    def __init__(self, store: Store, publish: Callable[[str, bytes, bool], None], *,
                 update_timeout_s: float = 900.0, min_samples: int = 20, max_bake_factor: float = 3.0) -> None:
        self.store = store
        self.publish = publish
        self.update_timeout_s = update_timeout_s
        self.min_samples = min_samples
        self.max_bake_factor = max(1.0, max_bake_factor)
        self._waiting: set[str] = set()

    # -- desired state

    def _desire_device(self, rid: str, device: str, model: str | None, version: str | None,
                       rollback: bool = False) -> None:
        topic = wire.desired_device_topic(device)
        if version is None or model is None:
            self.publish(topic, b"", True)  # clear the pin: the group's desired state applies
        else:
            self.publish(topic, wire.Desired(model=model, version=version, rollout=rid, rollback=rollback,
                                             issued_at=time.time()).to_json(), True)

    def _desire_group(self, rid: str, group: str, model: str, version: str) -> None:
        self.publish(wire.desired_group_topic(group),
                     wire.Desired(model=model, version=version, rollout=rid, issued_at=time.time()).to_json(), True)

    def republish(self) -> None:
        """Re-send the desired state of every active rollout (after the broker lost it)."""
        for r in self._rows("state IN ('canary','bake','rolling_back','full')"):
            self._publish_phase(r)

    def _publish_phase(self, r: dict[str, Any]) -> None:
        rid = r["id"]
        devs = self._devices(rid)
        if r["state"] in ("canary", "bake"):
            for d in devs:
                if d["phase"] == "canary":
                    self._desire_device(rid, d["device"], r["model"], r["version"])
        elif r["state"] == "rolling_back":
            for d in devs:
                if d["phase"] == "canary":
                    self._desire_device(rid, d["device"], d["previous_model"] or r["model"], d["previous_version"],
                                        rollback=True)
        elif r["state"] == "full":
            self._desire_group(rid, r["grp"], r["model"], r["version"])
            for d in devs:
                self._desire_device(rid, d["device"], None, None)

    # -- helpers

    def _rows(self, where: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.store.db.execute(f"SELECT * FROM rollouts WHERE {where} ORDER BY created")]

    def _devices(self, rid: str) -> list[dict[str, Any]]:
        return [dict(d) for d in self.store.db.execute(
            "SELECT rd.device, rd.phase, rd.previous_version, rd.previous_model, d.version, d.online "
            "FROM rollout_devices rd LEFT JOIN devices d ON d.id = rd.device WHERE rd.rollout=?", (rid,))]

    def _set(self, rid: str, state: str, message: str, *, reason: str | None = None, phase_started: bool = True) -> None:
        now = time.time()
        if phase_started:
            self.store.db.execute("UPDATE rollouts SET state=?, updated=?, phase_started=?, reason=COALESCE(?, reason)"
                                  " WHERE id=?", (state, now, now, reason, rid))
        else:
            self.store.db.execute("UPDATE rollouts SET state=?, updated=?, reason=COALESCE(?, reason) WHERE id=?",
                                  (state, now, reason, rid))
        log(self.store, rid, state, message)

    # -- the step

    def tick(self) -> None:
        for r in self._rows(f"state IN ({','.join(repr(s) for s in ACTIVE)})"):
            try:
                self.step(r)
            except Exception:
                logger.exception("rollout %s: step failed", r["id"])

    def step(self, r: dict[str, Any]) -> None:
        rid, state = r["id"], r["state"]
        if r["request"] == "abort":
            self.store.db.execute("UPDATE rollouts SET request=NULL WHERE id=?", (rid,))
            if state in ("canary", "bake"):
                self._rollback(r, "aborted by operator")
            else:
                self._set(rid, "aborted", "aborted by operator", reason="aborted by operator")
            return
        if r["paused"]:
            return
        getattr(self, f"_step_{state}")(r)

    def _step_pending(self, r: dict[str, Any]) -> None:
        rid = r["id"]
        devices = self.store.devices(group=r["grp"])
        if not devices:
            self._set(rid, "failed", f"no devices in group {r['grp']!r}", reason=f"no devices in group {r['grp']!r}")
            return
        devices.sort(key=lambda d: (not d["online"], d["id"]))
        n_canary = max(1, math.ceil(len(devices) * r["canary_pct"] / 100.0))
        with self.store.tx() as db:
            for i, d in enumerate(devices):
                db.execute("INSERT OR REPLACE INTO rollout_devices VALUES (?,?,?,?,?)",
                           (rid, d["id"], "canary" if i < n_canary else "rest", d["version"], d["model"]))
        canary = [d["id"] for d in devices[:n_canary]]
        self._set(rid, "canary", f"{len(canary)} of {len(devices)} devices get {r['version']}: {', '.join(canary)}")
        r = _row(self.store, rid)
        self._publish_phase(r)

    def _failed_updates(self, r: dict[str, Any], devices: list[str]) -> list[str]:
        out = []
        for e in self.store.events(since=r["created"]):
            if e["device"] in devices and e["name"] in FAILURE_EVENTS:
                v = e["fields"].get("version")
                if v in (None, r["version"]):
                    why = e["fields"].get("error") or e["fields"].get("reason") or e["name"]
                    out.append(f"{e['device']}: {e['name']} ({why})")
        return out

    def _step_canary(self, r: dict[str, Any]) -> None:
        devs = [d for d in self._devices(r["id"]) if d["phase"] == "canary"]
        names = [d["device"] for d in devs]
        failed = self._failed_updates(r, names)
        if failed:
            self._rollback(r, "canary update failed: " + "; ".join(failed[:5]))
            return
        if all(d["version"] == r["version"] for d in devs):
            self._set(r["id"], "bake", f"canary runs {r['version']}; baking {r['bake_s']:g}s under gate '{r['gate']}'")
            return
        if time.time() - (r["phase_started"] or r["created"]) > self.update_timeout_s:
            late = [d["device"] for d in devs if d["version"] != r["version"]]
            self._rollback(r, f"canary devices did not report {r['version']} within {self.update_timeout_s:g}s: {', '.join(late[:5])}")

    def _step_bake(self, r: dict[str, Any]) -> None:
        devs = [d["device"] for d in self._devices(r["id"]) if d["phase"] == "canary"]
        failed = self._failed_updates(r, devs)
        if failed:
            self._rollback(r, "canary device failed: " + "; ".join(failed[:5]))
            return
        summary = self.store.metric_summary(devs, r["version"], since=r["phase_started"] or r["created"])
        gate = Gate.parse(r["gate"])
        enough = (summary.get("count") or 0) >= self.min_samples
        if enough:
            broken = gate.broken(summary)
            if broken:
                self._rollback(r, f"gate broken on canary (n={summary['count']}): " + "; ".join(broken))
                return
        baked = time.time() - (r["phase_started"] or r["created"])
        if baked < r["bake_s"]:
            return
        if not enough and gate.clauses:
            n = summary.get("count") or 0
            if baked < r["bake_s"] * self.max_bake_factor:
                if r["id"] not in self._waiting:  # say it once in the history, not every tick
                    self._waiting.add(r["id"])
                    self._set(r["id"], "bake", f"bake time over, waiting for canary telemetry "
                                               f"(n={n}, need {self.min_samples})", phase_started=False)
                return
            self._rollback(r, f"not enough canary telemetry to judge the gate within "
                              f"{r['bake_s'] * self.max_bake_factor:g}s (n={n}, need {self.min_samples})")
            return
        self._set(r["id"], "full", f"gate passed on canary ({_fmt(summary)}); promoting {r['version']} to group {r['grp']}")
        self._publish_phase(_row(self.store, r["id"]))

    def _step_full(self, r: dict[str, Any]) -> None:
        devs = self._devices(r["id"])
        done = sum(1 for d in devs if d["version"] == r["version"])
        if done == len(devs):
            self._set(r["id"], "completed", f"all {len(devs)} devices run {r['version']}", phase_started=False)

    def _step_rolling_back(self, r: dict[str, Any]) -> None:
        devs = [d for d in self._devices(r["id"]) if d["phase"] == "canary"]
        if all(d["version"] == d["previous_version"] or d["previous_version"] is None for d in devs):
            final = "aborted" if (r["reason"] or "").startswith("aborted") else "rolled_back"
            fresh = [d["device"] for d in devs if d["previous_version"] is None]
            msg = f"canary devices are back on their previous version: {r['reason']}"
            if fresh:
                msg = (f"{len(devs) - len(fresh)} canary device(s) back on their previous version; "
                       f"{', '.join(fresh[:5])} had no earlier version and keep {r['version']} (publish a fixed "
                       f"version, or roll them back with `edgellm-agent rollback`): {r['reason']}")
            self._set(r["id"], final, msg, phase_started=False)

    def _rollback(self, r: dict[str, Any], reason: str) -> None:
        self._set(r["id"], "rolling_back", f"rolling back canary: {reason}", reason=reason)
        self._publish_phase(_row(self.store, r["id"]))


def _fmt(summary: dict[str, Any]) -> str:
    keys = ("count", "p95_latency_ms", "error_rate", "mean_logprob", "tokens_per_second")
    return ", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float) else f"{k}={summary.get(k)}"
                     for k in keys)


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2, default=str)

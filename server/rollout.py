"""Canary rollouts that promote or roll back on their own.

State machine (one active rollout per group)::

    pending ──► canary ──► bake ──► full ──► completed
                  │          │
                  └──────────┴──► rolling_back ──► rolled_back      (gate broken / update failed)
    any active state ──► aborted (operator; canary devices go back to their previous version)
    ``paused`` is a flag: a paused rollout does not move; ``resume`` restarts the bake timer.

* **canary**: ``ceil(canary% × devices)`` devices of the group (online first, then by id) get a
  retained per-device desired state for the new version; the rollout waits until they all
  report it (heartbeat/birth) — an update failure event (``edgellm.telemetry.UPDATE_FAILURES``) from one of them, or
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

import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

from edgellm import telemetry as wire
from edgellm.durations import parse_seconds
from edgellm.ids import ID_RULE, valid_id
from edgellm.telemetry import WireName
from server.errors import RolloutError, RolloutNotFound
from server.gate import GATE_METRICS, Clause, Gate, parse_percent
from server.store import MetricSummary, RolloutDeviceRow, RolloutRow, Store

__all__ = ["ACTIVE", "FINAL", "GATE_METRICS", "Clause", "Gate", "Phase", "RolloutDriver", "RolloutError",
           "RolloutState", "log", "parse_bake", "parse_percent", "request", "start", "status"]

logger = logging.getLogger(__name__)


class RolloutState(WireName):
    """A rollout's state: the one spelling used by the store, the API and the dashboard."""

    PENDING = "pending"
    CANARY = "canary"
    BAKE = "bake"
    FULL = "full"
    ROLLING_BACK = "rolling_back"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def tone(self) -> str:
        """How the dashboard colours it: ``ok``, ``bad`` or ``busy``."""
        if self is RolloutState.COMPLETED:
            return "ok"
        return "busy" if self in ACTIVE and self is not RolloutState.ROLLING_BACK else "bad"


class Phase(WireName):
    """A device's part in a rollout."""

    CANARY = "canary"
    REST = "rest"


S = RolloutState
ACTIVE = (S.PENDING, S.CANARY, S.BAKE, S.FULL, S.ROLLING_BACK)
FINAL = (S.COMPLETED, S.ROLLED_BACK, S.ABORTED, S.FAILED)
ACTIONS = ("pause", "resume", "abort", "rollback")
ABORTED_BY_OPERATOR = "aborted by operator"
ROLLED_BACK_BY_OPERATOR = "rolled back by operator"
WAITING = "bake time over, waiting for canary telemetry"


class _Moved(Exception):
    """Another driver moved the rollout since this one read it: act on the next tick."""


def parse_bake(text: str | float) -> float:
    """Bake time in seconds (the one duration parser, its refusal as a :class:`RolloutError`)."""
    try:
        return parse_seconds(text)
    except ValueError as e:
        raise RolloutError(str(e), hint="write e.g. --bake 30s, 10m or 2h") from None


# --------------------------------------------------------------------------- operator side


def _row(store: Store, rollout_id: str) -> RolloutRow:
    r = store.rollout(rollout_id)
    if r is None:
        raise RolloutNotFound(f"no rollout {rollout_id!r}", hint="list rollouts with `edgellm-server rollout status`")
    return r


def log(store: Store, rollout_id: str, state: str, message: str) -> None:
    store.log_rollout(rollout_id, state, message)
    logger.info("rollout %s: %s: %s", rollout_id, state, message)


def start(store: Store, *, model: str, version: str, group: str = "default", canary: str | float = "10%",
          gate: str | None = None, bake: str | float = "10m") -> str:
    """Record a new rollout (state ``pending``); the server's driver carries it out."""
    for what, value in (("model", model), ("version", version), ("group", group)):
        if not valid_id(value):
            raise RolloutError(f"{what} {value!r} is not valid", hint=f"use {ID_RULE}")
    pct = parse_percent(canary)
    g = Gate.parse(gate)
    bake_s = parse_bake(bake)
    busy = store.rollouts(states=ACTIVE, group=group)
    if busy:
        raise RolloutError(f"group {group!r} already has an active rollout {busy[0].id}",
                           hint=f"wait for it, or `edgellm-server rollout abort {busy[0].id}`")
    rid = f"r-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    store.create_rollout(rid, model=model, version=version, group=group, canary_pct=pct, gate=str(g), bake_s=bake_s,
                         state=S.PENDING)
    log(store, rid, S.PENDING, f"created: {model} {version} to group {group}, canary {pct:g}%, gate '{g}', bake {bake_s:g}s")
    return rid


def request(store: Store, rollout_id: str, action: str) -> None:
    """pause | resume | abort | rollback (abort and rollback are acted upon by the driver;
    pause/resume take effect at once). Rollback sends the canary back (canary and bake only)."""
    r = _row(store, rollout_id)
    if r.state in FINAL:
        raise RolloutError(f"rollout {rollout_id} is already {r.state}", hint="start a new rollout instead")
    if action == "pause":
        store.set_rollout_paused(rollout_id, True)
    elif action == "resume":
        store.set_rollout_paused(rollout_id, False, restart_phase_in=S.BAKE)
    elif action == "abort":
        store.set_rollout_request(rollout_id, "abort")
    elif action == "rollback":
        if r.state not in (S.PENDING, S.CANARY, S.BAKE):
            raise RolloutError(f"rollout {rollout_id} is {r.state}: only a canary can be rolled back",
                               hint="start a rollout of the previous version to move the whole group back")
        store.set_rollout_request(rollout_id, "rollback")
    else:
        raise RolloutError(f"unknown action {action!r}", hint=f"use one of {', '.join(ACTIONS)}")
    log(store, rollout_id, r.state, f"operator: {action}")


def status(store: Store, rollout_id: str | None = None) -> list[dict[str, Any]]:
    """Rollouts (newest first) with devices, progress and history, as the API shows them."""
    rows = [_row(store, rollout_id)] if rollout_id else store.rollouts(newest_first=True)
    out = []
    for r in rows:
        devs = store.rollout_devices(r.id)
        out.append({
            "id": r.id, "model": r.model, "version": r.version, "group": r.group, "canary_pct": r.canary_pct,
            "gate": r.gate, "bake_s": r.bake_s, "state": r.state, "tone": RolloutState(r.state).tone,
            "paused": r.paused, "reason": r.reason, "created": r.created, "updated": r.updated,
            "devices": len(devs), "canary_devices": sum(1 for d in devs if d.phase == Phase.CANARY),
            "on_new_version": sum(1 for d in devs if d.version == r.version),
            "device_states": [d.to_dict() for d in devs],
            "history": [h.to_dict() for h in store.rollout_log(r.id)],
        })
    return out


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2, default=str)


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

    # -- desired state

    def _desire_device(self, rid: str, device: str, model: str | None, version: str | None,
                       rollback: bool = False) -> None:
        topic = wire.desired_device_topic(device)
        if version is None or model is None:
            self.publish(topic, b"", True)  # clear the pin: the group's desired state applies
        else:
            self.publish(topic, wire.Desired(model=model, version=version, rollout=rid, rollback=rollback,
                                             issued_at=time.time()).to_json(), True)

    def republish(self) -> None:
        """Re-send the desired state of every active rollout (after the broker lost it)."""
        for r in self.store.rollouts(states=(S.CANARY, S.BAKE, S.ROLLING_BACK, S.FULL)):
            self._publish_phase(r)

    def _publish_phase(self, r: RolloutRow) -> None:
        if r.state in (S.CANARY, S.BAKE):
            for d in self._canary(r):
                self._desire_device(r.id, d.device, r.model, r.version)
        elif r.state == S.ROLLING_BACK:
            for d in self._canary(r):
                self._desire_device(r.id, d.device, d.previous_model or r.model, d.previous_version, rollback=True)
        elif r.state == S.FULL:
            self.publish(wire.desired_group_topic(r.group),
                         wire.Desired(model=r.model, version=r.version, rollout=r.id, issued_at=time.time()).to_json(),
                         True)
            for d in self.store.rollout_devices(r.id):
                self._desire_device(r.id, d.device, None, None)

    # -- helpers

    def _canary(self, r: RolloutRow) -> list[RolloutDeviceRow]:
        return self.store.rollout_devices(r.id, phase=Phase.CANARY)

    def _set(self, r: RolloutRow, state: RolloutState, message: str, *, reason: str | None = None,
             phase_started: bool = True) -> None:
        if not self.store.set_rollout_state(r.id, state, reason=reason, phase_started=phase_started, expect=r):
            raise _Moved(r.id)
        log(self.store, r.id, state, message)

    def _failed_updates(self, r: RolloutRow, devices: list[str]) -> list[str]:
        """Failure events from ``devices`` about this rollout's version since it was created."""
        out = []
        for e in self.store.events_of(devices, wire.UPDATE_FAILURES, since=r.created):
            v = e.fields.get("version")
            if v in (None, r.version):
                why = e.fields.get("error") or e.fields.get("reason") or e.name
                out.append(f"{e.device}: {e.name} ({str(why)[:200]})")
        return out

    # -- the step

    def tick(self) -> None:
        for r in self.store.rollouts(states=ACTIVE):
            try:
                self.step(r)
            except _Moved:
                logger.info("rollout %s: moved by another driver; re-read on the next tick", r.id)
            except Exception:
                logger.exception("rollout %s: step failed", r.id)

    def step(self, r: RolloutRow) -> None:
        if r.request in ("abort", "rollback"):
            why = ABORTED_BY_OPERATOR if r.request == "abort" else ROLLED_BACK_BY_OPERATOR
            self.store.set_rollout_request(r.id, None)
            if r.state in (S.CANARY, S.BAKE):
                self._rollback(r, why)
            else:
                self._set(r, S.ABORTED if r.request == "abort" else S.ROLLED_BACK, why, reason=why)
            return
        if r.paused:
            return
        {S.PENDING: self._step_pending, S.CANARY: self._step_canary, S.BAKE: self._step_bake,
         S.FULL: self._step_full, S.ROLLING_BACK: self._step_rolling_back}[RolloutState(r.state)](r)

    def _step_pending(self, r: RolloutRow) -> None:
        devices = self.store.devices(group=r.group)
        if not devices:
            self._set(r, S.FAILED, f"no devices in group {r.group!r}", reason=f"no devices in group {r.group!r}")
            return
        devices.sort(key=lambda d: (not d.online, d.id))
        n_canary = max(1, math.ceil(len(devices) * r.canary_pct / 100.0))
        self.store.assign_rollout_devices(r.id, [(d.id, str(Phase.CANARY if i < n_canary else Phase.REST),
                                                  d.version, d.model) for i, d in enumerate(devices)])
        canary = [d.id for d in devices[:n_canary]]
        self._set(r, S.CANARY, f"{len(canary)} of {len(devices)} devices get {r.version}: {', '.join(canary)}")
        self._publish_phase(_row(self.store, r.id))

    def _step_canary(self, r: RolloutRow) -> None:
        devs = self._canary(r)
        failed = self._failed_updates(r, [d.device for d in devs])
        if failed:
            self._rollback(r, "canary update failed: " + "; ".join(failed[:5]))
            return
        if all(d.version == r.version for d in devs):
            self._set(r, S.BAKE, f"canary runs {r.version}; baking {r.bake_s:g}s under gate '{r.gate}'")
            return
        if time.time() - (r.phase_started or r.created) > self.update_timeout_s:
            late = [d.device for d in devs if d.version != r.version]
            self._rollback(r, f"canary devices did not report {r.version} within {self.update_timeout_s:g}s: "
                              f"{', '.join(late[:5])}")

    def _step_bake(self, r: RolloutRow) -> None:
        devs = [d.device for d in self._canary(r)]
        failed = self._failed_updates(r, devs)
        if failed:
            self._rollback(r, "canary device failed: " + "; ".join(failed[:5]))
            return
        summary = self.store.metric_summary(devs, r.version, since=r.phase_started or r.created)
        gate = Gate.parse(r.gate)
        enough = summary.count >= self.min_samples
        broken = gate.broken(summary) if enough else []
        if broken:
            self._rollback(r, f"gate broken on canary (n={summary.count}): " + "; ".join(broken))
            return
        baked = time.time() - (r.phase_started or r.created)
        if baked < r.bake_s:
            return
        if not enough and gate.clauses:
            self._wait_for_evidence(r, summary.count, baked)
            return
        self._set(r, S.FULL, f"gate passed on canary ({_fmt(summary)}); promoting {r.version} to group {r.group}")
        self._publish_phase(_row(self.store, r.id))

    def _wait_for_evidence(self, r: RolloutRow, n: int, baked: float) -> None:
        """A quiet canary keeps baking up to ``max_bake_factor`` bakes, then rolls back."""
        if baked < r.bake_s * self.max_bake_factor:
            # said once in the history, not every tick (nor again by a new leader: read from the store)
            if not any(h.message.startswith(WAITING) for h in self.store.rollout_log(r.id)
                       if h.ts >= (r.phase_started or r.created)):
                self._set(r, S.BAKE, f"{WAITING} (n={n}, need {self.min_samples})", phase_started=False)
            return
        self._rollback(r, f"not enough canary telemetry to judge the gate within "
                          f"{r.bake_s * self.max_bake_factor:g}s (n={n}, need {self.min_samples})")

    def _step_full(self, r: RolloutRow) -> None:
        devs = self.store.rollout_devices(r.id)
        if all(d.version == r.version for d in devs):
            self._set(r, S.COMPLETED, f"all {len(devs)} devices run {r.version}", phase_started=False)

    def _step_rolling_back(self, r: RolloutRow) -> None:
        devs = self._canary(r)
        if not all(d.version == d.previous_version or d.previous_version is None for d in devs):
            return
        final = S.ABORTED if (r.reason or "").startswith(ABORTED_BY_OPERATOR) else S.ROLLED_BACK
        fresh = [d.device for d in devs if d.previous_version is None]
        msg = f"canary devices are back on their previous version: {r.reason}"
        if fresh:
            msg = (f"{len(devs) - len(fresh)} canary device(s) back on their previous version; "
                   f"{', '.join(fresh[:5])} had no earlier version and keep {r.version} (publish a fixed "
                   f"version, or roll them back with `edgellm-agent rollback`): {r.reason}")
        self._set(r, final, msg, phase_started=False)

    def _rollback(self, r: RolloutRow, reason: str) -> None:
        self._set(r, S.ROLLING_BACK, f"rolling back canary: {reason}", reason=reason)
        self._publish_phase(_row(self.store, r.id))


def _fmt(summary: MetricSummary) -> str:
    keys = ("count", "p95_latency_ms", "error_rate", "mean_logprob", "tokens_per_second")
    return ", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary[k], float) else f"{k}={summary[k]}" for k in keys)

"""Staged rollouts that promote, stall or roll back on evidence. A rollout *assigns*: every
step is a signed assignment change made by :class:`server.director.Director`.

State machine (one active rollout per group; ``stage`` counts the stages, 0 is the canary)::

    pending ──► canary ──► bake ──► (next stage: canary ──► bake ...) ──► full ──► completed
                                                         (the last stage, 100%, is "full")
                  │  ▲       │                                              │
                  ▼  │       ▼                                              ▼
                stalled    rolling_back ──► rolled_back | aborted        stalled
    completed ──► rolling_back   (`rollout rollback`: re-assign what the group ran before)

* **pending**: the devices of the group are ordered: online ones not on the target first (the
  canary is drawn from them only), then offline ones, then those already on it.
* **canary** (stage *i*): the first ``ceil(stages[i] × devices)`` devices get a per-device
  assignment; the stage waits until they report the version. An update failure of a stage-0
  device rolls back; a device that does not converge within ``device_timeout_s`` rolls back the
  canary, or makes a later stage ``stalled`` (with each late device's last update error) until
  it converges or the operator acts (``device retry``, ``rollout rollback``, ``abort``).
* **bake** (every stage): the gate is judged on the stage's devices' metrics for the new
  version since the bake started. A gate needs ``min_samples`` inferences: a broken clause rolls
  back at once; without enough samples the stage keeps baking (up to ``max_bake_factor`` bakes,
  then rolls back). ``--no-gate`` promotes on bake time alone, and only when asked.
* **full**: the group's assignment becomes the new version and per-device assignments are
  cleared; the rollout completes when every device reports it.
* **rolling_back**: the group's previous assignment is restored, each device goes back to what
  it ran before (its previous version, if it had one); the version left is not rejected by any
  device that did not fail it.

The driver (:mod:`server.driver`) is the only writer of states other than the operator's
requests (pause/resume/abort/rollback are flags it acts on), so CLI processes talk to a running
server through the shared store.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from typing import TYPE_CHECKING, Any

from edgellm.durations import parse_seconds
from edgellm.ids import ID_RULE, valid_id
from edgellm.telemetry import WireName
from server.errors import RolloutError, RolloutNotFound
from server.gate import GATE_METRICS, Clause, Gate, parse_percent
from server.store import RolloutRow, Store

if TYPE_CHECKING:
    from server.director import Director
    from server.driver import RolloutDriver

__all__ = [
    "ACTIVE",
    "FINAL",
    "GATE_METRICS",
    "Clause",
    "Gate",
    "Phase",
    "RolloutDriver",
    "RolloutError",
    "RolloutState",
    "log",
    "parse_bake",
    "parse_percent",
    "parse_stages",
    "request",
    "start",
    "status",
]

logger = logging.getLogger(__name__)


class RolloutState(WireName):
    """A rollout's state: the one spelling used by the store, the API and the dashboard."""

    PENDING = "pending"
    CANARY = "canary"
    BAKE = "bake"
    FULL = "full"
    STALLED = "stalled"
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
        return "busy" if self in ACTIVE and self not in (RolloutState.ROLLING_BACK, RolloutState.STALLED) else "bad"


class Phase(WireName):
    """A device's part in a rollout: the canary (stage 0), a later stage, or the rest."""

    CANARY = "canary"
    REST = "rest"

    @staticmethod
    def of_stage(i: int) -> str:
        return "canary" if i == 0 else f"stage{i}"


S = RolloutState
ACTIVE = (S.PENDING, S.CANARY, S.BAKE, S.FULL, S.STALLED, S.ROLLING_BACK)
FINAL = (S.COMPLETED, S.ROLLED_BACK, S.ABORTED, S.FAILED)
ACTIONS = ("pause", "resume", "abort", "rollback")
ABORTED_BY_OPERATOR = "aborted by operator"
ROLLED_BACK_BY_OPERATOR = "rolled back by operator"
DEFAULT_DEVICE_TIMEOUT = "15m"


def parse_bake(text: str | float) -> float:
    """Bake time in seconds (the one duration parser, its refusal as a :class:`RolloutError`)."""
    try:
        return parse_seconds(text)
    except ValueError as e:
        raise RolloutError(str(e), hint="write e.g. --bake 30s, 10m or 2h") from None


def parse_stages(text: str | None, canary: float) -> list[float]:
    """``"10%,50%,100%"`` -> the stage shares, the canary first and 100% last."""
    rest = [parse_percent(p) for p in (text or "").split(",") if p.strip()]
    if rest != sorted(rest):
        raise RolloutError(f"stages {text!r} must grow", hint="write e.g. --stages 10%,50%,100%")
    stages = [canary, *[p for p in rest if p > canary]]
    return stages if stages[-1] == 100.0 else [*stages, 100.0]


# --------------------------------------------------------------------------- operator side


def _row(store: Store, rollout_id: str) -> RolloutRow:
    r = store.rollout(rollout_id)
    if r is None:
        raise RolloutNotFound(f"no rollout {rollout_id!r}", hint="list rollouts with `edgellm-server rollout status`")
    return r


def log(store: Store, rollout_id: str, state: str, message: str) -> None:
    store.log_rollout(rollout_id, state, message)
    logger.info("rollout %s: %s: %s", rollout_id, state, message)


def gate_of(gate: str | None, no_gate: bool) -> Gate:
    """The rollout's gate: one is needed, unless ``no_gate`` says so explicitly."""
    g = Gate.parse(gate)
    if not g.clauses and not no_gate:
        raise RolloutError(
            "a rollout needs a gate: without one nothing stops a broken model reaching the group",
            hint="pass --gate 'p95_latency_ms<=800,error_rate<=0.01,mean_logprob>=-2.5' "
            "(or --no-gate to promote on bake time alone)",
        )
    if g.clauses and no_gate:
        raise RolloutError("--gate and --no-gate contradict each other", hint="pass one of them")
    return g


def start(
    store: Store,
    *,
    model: str,
    version: str,
    group: str = "default",
    canary: str | float = "10%",
    gate: str | None = None,
    no_gate: bool = False,
    bake: str | float = "10m",
    stages: str | None = None,
    min_samples: int | None = None,
    device_timeout: str | float = DEFAULT_DEVICE_TIMEOUT,
    director: Director | None = None,
    adapter: str | None = None,
    prefer: str = "adapter",
) -> str:
    """Record a new rollout (state ``pending``); the server's driver carries it out.

    A rollout needs a ``gate`` or an explicit ``no_gate``; ``director`` (when given) refuses a
    version that is yanked or not published. Each device gets the release's adapter bundle
    (``adapter`` ``NAME[@VERSION]``, by default the one published at ``version`` on ``model``)
    when it runs exactly that adapter's base artifact, the full bundle otherwise; ``prefer``
    ``full`` ships full bundles only (:mod:`server.release`)."""
    from server.release import PREFER, parse_adapter

    for what, value in (("model", model), ("version", version), ("group", group)):
        if not valid_id(value):
            raise RolloutError(f"{what} {value!r} is not valid", hint=f"use {ID_RULE}")
    g = gate_of(gate, no_gate)
    if min_samples is not None and not 1 <= min_samples <= 10**9:
        raise RolloutError(f"--min-samples {min_samples} must be at least 1", hint="write e.g. --min-samples 50")
    if store.is_yanked(model, version):
        raise RolloutError(
            f"{model} {version} is yanked: no rollout may name it", hint="publish a fixed version and roll that out"
        )
    if prefer not in PREFER:
        raise RolloutError(f"--prefer {prefer!r} is not one of {', '.join(PREFER)}", hint="--prefer adapter")
    named = parse_adapter(adapter, version)
    if director is not None:
        from server.release import Release

        director.check_assignable(model, version)
        Release(director.repo, model, version, adapter=named, prefer=prefer)  # refuses a missing or unclear adapter
    pct = parse_percent(canary)
    plan = parse_stages(stages, pct)
    bake_s = parse_bake(bake)
    timeout_s = parse_bake(device_timeout)
    busy = store.rollouts(states=ACTIVE, group=group)
    if busy:
        raise RolloutError(
            f"group {group!r} already has an active rollout {busy[0].id}",
            hint=f"wait for it, or `edgellm-server rollout abort {busy[0].id}`",
        )
    rid = f"r-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    with store.tx():
        store.create_rollout(
            rid, model=model, version=version, group=group, canary_pct=pct, gate=str(g), bake_s=bake_s, state=S.PENDING
        )
        store.create_plan(
            rid,
            stages=plan,
            min_samples=min_samples or 0,
            device_timeout_s=timeout_s,
            no_gate=no_gate,
            release={"prefer": prefer, "adapter": list(named) if named else None},
        )
    log(
        store,
        rid,
        S.PENDING,
        f"created: {model} {version} to group {group}, stages "
        f"{','.join(f'{p:g}%' for p in plan)}, gate '{g or 'none (--no-gate)'}', bake {bake_s:g}s"
        + (f", adapter {named[0]} {named[1]} where a device runs its base" if named else "")
        + (", full bundles only (--prefer full)" if prefer == "full" else ""),
    )
    return rid


def request(store: Store, rollout_id: str, action: str) -> None:
    """pause | resume | abort | rollback (acted upon by the driver; pause/resume at once).
    ``rollback`` also takes a completed rollout back: the group's previous assignment returns."""
    r = _row(store, rollout_id)
    if action == "rollback" and r.state == S.COMPLETED:
        newer = [x for x in store.rollouts(group=r.group) if x.created > r.created and x.state != S.FAILED]
        if newer:
            raise RolloutError(
                f"rollout {newer[-1].id} came after {rollout_id} in group {r.group}",
                hint=f"roll back the newest one: `edgellm-server rollout rollback {newer[-1].id}`",
            )
        store.set_rollout_state(rollout_id, S.ROLLING_BACK, reason=ROLLED_BACK_BY_OPERATOR)
        store.set_rollout_request(rollout_id, "rollback")
    elif r.state in FINAL:
        raise RolloutError(f"rollout {rollout_id} is already {r.state}", hint="start a new rollout instead")
    elif action == "pause":
        store.set_rollout_paused(rollout_id, True)
    elif action == "resume":
        store.set_rollout_paused(rollout_id, False, restart_phase_in=S.BAKE)
    elif action in ("abort", "rollback"):
        store.set_rollout_request(rollout_id, action)
    else:
        raise RolloutError(f"unknown action {action!r}", hint=f"use one of {', '.join(ACTIONS)}")
    log(store, rollout_id, r.state, f"operator: {action}")


def _bake_left(r: RolloutRow) -> float | None:
    if r.state != S.BAKE or r.paused:
        return None
    return max(0.0, r.bake_s - (time.time() - (r.phase_started or r.created)))


def status(store: Store, rollout_id: str | None = None) -> list[dict[str, Any]]:
    """Rollouts (newest first): stage, bake time left, samples against min-samples, the gate's
    current values, per-device state and history. Finished rollouts keep their final counts."""
    from server import wire

    rows = [_row(store, rollout_id)] if rollout_id else store.rollouts(newest_first=True)
    reports = store.update_reports()
    out = []
    for r in rows:
        plan = store.plan(r.id)
        devs = store.rollout_devices(r.id)
        onwire = wire.summary(store, r, devs)
        per_device = onwire.pop("per_device")
        done = wire.converged(store, r, [(d.device, d.version) for d in devs], store.rollout_choices(r.id))
        staged = [d.device for d in devs if d.phase != Phase.REST]
        live = (
            store.metric_summary(staged, r.version, since=r.phase_started or r.created) if r.state == S.BAKE else None
        )
        final = plan["final"] or {}
        device_states = [
            {
                **d.to_dict(),
                "converged": d.device in done,
                "last_error": reports.get(d.device, {}).get("last_error"),
                **per_device.get(d.device, {"kind": None, "planned_bytes": None, "reported_bytes": None}),
            }
            for d in devs
        ]
        out.append(
            {
                "id": r.id,
                "model": r.model,
                "version": r.version,
                "group": r.group,
                "canary_pct": r.canary_pct,
                "gate": r.gate,
                "no_gate": plan["no_gate"],
                "bake_s": r.bake_s,
                "state": r.state,
                "tone": RolloutState(r.state).tone,
                "paused": r.paused,
                "reason": r.reason,
                "created": r.created,
                "updated": r.updated,
                "stages": plan["stages"],
                "stage": plan["stage"],
                "bake_left_s": _bake_left(r),
                "min_samples": plan["min_samples"],
                "device_timeout_s": plan["device_timeout_s"],
                "samples": live.count if live is not None else None,
                "gate_values": ({k: live[k] for k in GATE_METRICS} if live is not None else None),
                "previous": plan["previous"],
                "stalled": plan["stalled"] if r.state == S.STALLED else None,
                "devices": final.get("devices", len(devs)),
                "canary_devices": sum(1 for d in devs if d.phase == Phase.CANARY),
                "on_new_version": final.get("on_new_version", len(done)),
                "release": plan.get("release") or {},
                "wire": onwire,
                "final": plan["final"],
                "device_states": device_states,
                "history": [h.to_dict() for h in store.rollout_log(r.id)],
            }
        )
    return out


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2, default=str)


def canary_size(n_devices: int, pct: float) -> int:
    return max(1, math.ceil(n_devices * pct / 100.0))


def __getattr__(name: str) -> Any:
    if name == "RolloutDriver":  # the driver lives in its own module; this keeps the old import
        from server.driver import RolloutDriver

        return RolloutDriver
    raise AttributeError(name)

"""The rollout driver: moves every active rollout one step per :meth:`RolloutDriver.tick`
(the state machine is drawn in :mod:`server.rollout`). Every device-facing step is an
assignment change through :class:`server.director.Director`."""

from __future__ import annotations

import logging
import time
from typing import Any

from edgellm import telemetry as wire
from server import wire as onwire
from server.director import Change, Director
from server.errors import RolloutError
from server.gate import Gate
from server.release import Release
from server.rollout import (
    ABORTED_BY_OPERATOR,
    ACTIVE,
    ROLLED_BACK_BY_OPERATOR,
    Phase,
    RolloutState,
    canary_size,
    log,
)
from server.store import Choice, MetricSummary, RolloutDeviceRow, RolloutRow, Store

logger = logging.getLogger(__name__)
S = RolloutState
WAITING = "bake time over, waiting for telemetry"


def _adapter_note(devices: list[str], choices: dict[str, Any]) -> str:
    """ " (2 as adapter kitchen on their base)" for the devices given the adapter, else ""."""
    ads = [choices[d] for d in devices if d in choices and choices[d].kind == "adapter"]
    return f" ({len(ads)} as adapter {ads[0].adapter} on their base)" if ads else ""


class _Moved(Exception):
    """Another driver moved the rollout since this one read it: act on the next tick."""


class RolloutDriver:
    def __init__(
        self,
        store: Store,
        director: Director,
        *,
        update_timeout_s: float = 900.0,
        min_samples: int = 20,
        max_bake_factor: float = 3.0,
    ) -> None:
        self.store = store
        self.director = director
        self.update_timeout_s = update_timeout_s
        self.min_samples = min_samples
        self.max_bake_factor = max(1.0, max_bake_factor)

    def republish(self) -> None:
        """Re-send every assignment's nudge (after the broker lost its retained messages)."""
        self.director.republish()

    # -- helpers

    def _set(
        self, r: RolloutRow, state: RolloutState, message: str, *, reason: str | None = None, phase_started: bool = True
    ) -> None:
        if not self.store.set_rollout_state(r.id, state, reason=reason, phase_started=phase_started, expect=r):
            raise _Moved(r.id)
        log(self.store, r.id, state, message)

    def _once(self, r: RolloutRow, prefix: str, state: RolloutState, message: str, **kw: Any) -> None:
        """Say it once in the phase's history, not every tick (nor again after a new leader took
        over: the history is read from the store)."""
        since = r.phase_started or r.created
        if not any(h.message.startswith(prefix) for h in self.store.rollout_log(r.id) if h.ts >= since):
            self._set(r, state, message, phase_started=False, **kw)

    def _plan(self, r: RolloutRow) -> dict[str, Any]:
        p = self.store.plan(r.id)
        p["min_samples"] = p["min_samples"] or self.min_samples
        p["device_timeout_s"] = p["device_timeout_s"] or self.update_timeout_s
        return p

    def _staged(self, r: RolloutRow) -> list[RolloutDeviceRow]:
        return [d for d in self.store.rollout_devices(r.id) if d.phase != Phase.REST]

    def _failed_updates(self, r: RolloutRow, devices: list[str], since: float) -> list[str]:
        """Failure events from ``devices`` about this rollout's version (or the adapter a device
        was given) since ``since``."""
        out = []
        choices = self.store.rollout_choices(r.id)
        for e in self.store.events_of(devices, wire.UPDATE_FAILURES, since=since):
            v, c = e.fields.get("version"), choices.get(e.device)
            if (e.fields.get("adapter") is None and v in (None, r.version)) or (
                c is not None and c.kind == "adapter" and e.fields.get("adapter") == c.adapter
            ):
                why = e.fields.get("error") or e.fields.get("reason") or e.name
                out.append(f"{e.device}: {e.name} ({str(why)[:200]})")
        return out

    def _late(self, devs: list[RolloutDeviceRow], want: dict[str, str | None], done: set[str] | None = None) -> str:
        """Devices not on their wanted version (not in ``done``, when given), each with its last update error."""
        reports = self.store.update_reports()
        parts = []
        for d in devs:
            if want.get(d.device) is not None and (
                d.version != want[d.device] if done is None else d.device not in done
            ):
                err = reports.get(d.device, {}).get("last_error")
                parts.append(
                    f"{d.device} (runs {d.version or 'nothing'}, {'online' if d.online else 'offline'}"
                    f"{', last update error: ' + err if err else ', no update error reported'})"
                )
        return "; ".join(parts[:10])

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
            self.store.set_rollout_request(r.id, None)
            self._rollback(r, ABORTED_BY_OPERATOR if r.request == "abort" else ROLLED_BACK_BY_OPERATOR)
            return
        if r.paused:
            return
        {
            S.PENDING: self._step_pending,
            S.CANARY: self._step_converge,
            S.STALLED: self._step_converge,
            S.BAKE: self._step_bake,
            S.FULL: self._step_converge,
            S.ROLLING_BACK: self._step_rolling_back,
        }[RolloutState(r.state)](r)

    def _step_pending(self, r: RolloutRow) -> None:
        devices = self.store.devices(group=r.group)
        if not devices:
            self._set(r, S.FAILED, f"no devices in group {r.group!r}", reason=f"no devices in group {r.group!r}")
            return
        try:
            self.director.check_assignable(r.model, r.version)
            release = self._release(r)
        except RolloutError as e:
            self._set(r, S.FAILED, str(e), reason=str(e))
            return
        choices = {d.id: release.choose(d) for d in devices}
        self.store.set_rollout_choices(r.id, choices)
        self.store.update_plan(r.id, previous=self._group_before(r, devices))
        done = onwire.converged(self.store, r, [(d.id, d.version) for d in devices], choices)
        off = [d for d in devices if d.id not in done]
        order = sorted(off, key=lambda d: (not d.online, d.id)) + [d for d in devices if d.id in done]
        self.store.assign_rollout_devices(r.id, [(d.id, str(Phase.REST), d.version, d.model) for d in order])
        if not off:
            self._promote_full(r, f"every device of {r.group} already runs {r.version}")
            return
        if not any(d.online for d in off):
            why = f"no online device of group {r.group} is off {r.version}: nothing to canary"
            self._set(r, S.FAILED, why, reason=why)
            return
        self._enter_stage(r, 0, order)

    def _release(self, r: RolloutRow) -> Release:
        rel = self._plan(r).get("release") or {}
        adapter = rel.get("adapter")
        return Release(
            self.director.repo,
            r.model,
            r.version,
            adapter=(adapter[0], adapter[1]) if adapter else None,
            prefer=rel.get("prefer", "adapter"),
        )

    @staticmethod
    def _change(r: RolloutRow, device: str, choices: dict[str, Choice]) -> Change:
        """``device``'s assignment in this rollout: its part of the release (the release's
        version for a rollout made before choices were recorded)."""
        c = choices.get(device)
        if c is None:
            return Change("device", device, r.model, r.version, r.id)
        return Change("device", device, c.model, c.version, r.id, c.adapters)

    def _group_before(self, r: RolloutRow, devices: list[Any]) -> dict[str, Any] | None:
        """What the group ran before: its assignment, or (never assigned) the version most of
        its devices run, if it can be assigned; a rollback re-assigns it."""
        prev = self.director.of("group", r.group)
        if prev is not None and prev.version is not None:
            return {"model": prev.model, "version": prev.version}
        runs = _count(f"{d.model}\0{d.version}" for d in devices if d.model and d.version and d.version != r.version)
        for key, _ in sorted(runs.items(), key=lambda kv: -kv[1]):
            model, version = key.split("\0")
            if not self.store.is_yanked(model, version) and self.director.targets_for(model, version):
                return {"model": model, "version": version, "inferred": True}
        return None

    def _enter_stage(self, r: RolloutRow, i: int, order: list[Any] | None = None) -> None:
        plan = self._plan(r)
        devs = self.store.rollout_devices(r.id)
        by_id = {d.device: d for d in devs}
        ids = [d.id for d in order] if order is not None else self._order(devs)
        n = canary_size(len(ids), plan["stages"][i])
        choices = self.store.rollout_choices(r.id)
        if i == 0:  # the canary only from online devices not on the target
            done = onwire.converged(self.store, r, [(d.device, d.version) for d in devs], choices)
            ids = [x for x in ids if by_id[x].online and x not in done]
        chosen = ids[:n]
        self.store.assign_rollout_devices(
            r.id,
            [
                (
                    x,
                    Phase.of_stage(i) if by_id[x].phase == Phase.REST else by_id[x].phase,
                    by_id[x].previous_version,
                    by_id[x].previous_model,
                )
                for x in chosen
            ],
        )
        self.store.update_plan(r.id, stage=i, stalled=None)
        self.director.apply(
            [self._change(r, x, choices) for x in chosen if by_id[x].phase == Phase.REST]
        )  # the devices new to this stage
        what = "canary" if i == 0 else f"stage {i + 1}/{len(plan['stages'])}"
        split = _adapter_note(chosen, choices)
        self._set(
            r,
            S.CANARY,
            f"{what}: {len(chosen)} of {len(devs)} devices assigned {r.version}{split}: {', '.join(chosen[:10])}",
        )

    def _order(self, devs: list[RolloutDeviceRow]) -> list[str]:
        staged = [d.device for d in devs if d.phase != Phase.REST]
        rest = sorted((d for d in devs if d.phase == Phase.REST), key=lambda d: (not d.online, d.device))
        return staged + [d.device for d in rest]

    def _step_converge(self, r: RolloutRow) -> None:
        """canary (a stage's devices), full (the group) or stalled (either): wait for the version."""
        plan = self._plan(r)
        full = r.state == S.FULL or (r.state == S.STALLED and plan["stalled"] == "full")
        devs = self.store.rollout_devices(r.id) if full else self._staged(r)
        since = r.phase_started or r.created
        failed = self._failed_updates(r, [d.device for d in devs], since)
        canary = plan["stage"] == 0 and not full
        if failed and canary:
            self._rollback(r, "canary update failed: " + "; ".join(failed[:5]))
            return
        choices = self.store.rollout_choices(r.id)
        done = onwire.converged(self.store, r, [(d.device, d.version) for d in devs], choices)
        if all(d.device in done for d in devs):
            if full:
                how = _adapter_note([d.device for d in devs], choices)
                self._finish(r, S.COMPLETED, f"all {len(devs)} devices run {r.version}{how}")
            else:
                self.store.update_plan(r.id, stalled=None)
                gate = "no gate (--no-gate)" if plan["no_gate"] else f"gate '{r.gate}'"
                self._set(
                    r,
                    S.BAKE,
                    f"stage {plan['stage'] + 1}/{len(plan['stages'])} runs {r.version}; "
                    f"baking {r.bake_s:g}s under {gate}, min samples {plan['min_samples']}",
                )
            return
        late = self._late(devs, {d.device: onwire.wanted_version(r, d.device, choices) for d in devs}, done)
        if time.time() - since <= plan["device_timeout_s"] and not failed:
            return
        why = (
            f"did not reach {r.version} within {plan['device_timeout_s']:g}s: {late}"
            if not failed
            else "update failed: " + "; ".join(failed[:5])
        )
        if canary:
            self._rollback(r, f"canary devices {why}")
            return
        self.store.update_plan(r.id, stalled="full" if full else "stage")
        self._once(r, f"stalled: {why}"[:60], S.STALLED, f"stalled: {why}", reason=f"stalled: {why}")

    def _step_bake(self, r: RolloutRow) -> None:
        plan = self._plan(r)
        devs = [d.device for d in self._staged(r)]
        since = r.phase_started or r.created
        failed = self._failed_updates(r, devs, since)
        if failed:
            self._rollback(r, "device failed during the bake: " + "; ".join(failed[:5]))
            return
        choices = self.store.rollout_choices(r.id)
        # devices on an adapter report their base's version: then every metric since the bake began
        mixed = any(choices[d].kind == "adapter" for d in devs if d in choices)
        summary = self.store.metric_summary(devs, None if mixed else r.version, since=since)
        gate = Gate.parse(r.gate)
        enough = summary.count >= plan["min_samples"]
        broken = gate.broken(summary) if enough else []
        if broken:
            self._rollback(r, f"gate broken (n={summary.count}): " + "; ".join(broken))
            return
        baked = time.time() - since
        if baked < r.bake_s:
            return
        if gate.clauses and not enough:
            self._wait_for_evidence(r, summary.count, baked, plan["min_samples"])
            return
        evidence = f"gate passed ({_fmt(summary)})" if gate.clauses else "no gate (--no-gate), bake time over"
        nxt = plan["stage"] + 1
        if nxt < len(plan["stages"]) - 1:  # the last stage (100%) is the group's assignment
            log(self.store, r.id, S.BAKE, f"{evidence}; next stage {plan['stages'][nxt]:g}%")
            self._enter_stage(r, nxt)
        else:
            self._promote_full(r, f"{evidence}; promoting {r.version} to group {r.group}")

    def _wait_for_evidence(self, r: RolloutRow, n: int, baked: float, need: int) -> None:
        """A quiet stage keeps baking up to ``max_bake_factor`` bakes, then rolls back."""
        if baked < r.bake_s * self.max_bake_factor:
            self._once(r, WAITING, S.BAKE, f"{WAITING} (n={n}, need {need})")
            return
        self._rollback(
            r,
            f"not enough telemetry to judge the gate within {r.bake_s * self.max_bake_factor:g}s (n={n}, need {need})",
        )

    def _promote_full(self, r: RolloutRow, message: str) -> None:
        current = self.director.assignments()
        changes = [Change("group", r.group, r.model, r.version, r.id)]
        # the group's assignment becomes what every device of it runs: per-device pins go
        # (this rollout's stages, and pins left by earlier rollbacks), except for the devices
        # that take the release as an adapter on their base: they keep (or get) that pin
        choices = self.store.rollout_choices(r.id)
        for d in self.store.rollout_devices(r.id):
            a, c = self.director.of("device", d.device, current), choices.get(d.device)
            if c is not None and c.kind == "adapter":
                if a is None or (a.model, a.version, a.adapters) != (c.model, c.version, c.adapters):
                    changes.append(self._change(r, d.device, choices))
            elif a is not None and a.version is not None:
                changes.append(Change("device", d.device))
        self.director.apply(changes)
        self.store.update_plan(r.id, stage=len(self._plan(r)["stages"]) - 1)
        self._set(r, S.FULL, message)

    # -- rollback

    def _rollback(self, r: RolloutRow, reason: str) -> None:
        """Re-assign what the group ran before: its previous assignment, and each device its
        previous version (a device with none keeps the new one, and the reason says so)."""
        plan = self._plan(r)
        prev = plan["previous"]
        changes: list[Change] = []
        current = self.director.of("group", r.group)
        if prev is not None and (current is None or current.version != prev["version"]):
            changes.append(Change("group", r.group, prev["model"], prev["version"], r.id))
        elif prev is None and current is not None and current.version == r.version:
            changes.append(Change("group", r.group))
        for d in self.store.rollout_devices(r.id):
            back = d.previous_version
            if back is None or back == r.version or (prev is not None and back == prev["version"]):
                if self.director.of("device", d.device) is not None:
                    changes.append(Change("device", d.device))
            elif not self.store.is_yanked(d.previous_model or r.model, back) and self.director.targets_for(
                d.previous_model or r.model, back
            ):
                changes.append(Change("device", d.device, d.previous_model or r.model, back, r.id))
            elif self.director.of("device", d.device) is not None:
                changes.append(Change("device", d.device))
        self.director.apply(changes)
        self._set(r, S.ROLLING_BACK, f"rolling back: {reason}", reason=reason)

    def _wanted_back(self, r: RolloutRow) -> dict[str, str | None]:
        prev = self._plan(r)["previous"]
        out: dict[str, str | None] = {}
        current = self.director.assignments()
        for d in self.store.rollout_devices(r.id):
            want = self.director.desired_version(d.device, r.group, current)
            out[d.device] = want if want is not None else (prev or {}).get("version") or d.previous_version
        return out

    def _step_rolling_back(self, r: RolloutRow) -> None:
        devs = self.store.rollout_devices(r.id)
        want = self._wanted_back(r)
        final = S.ABORTED if (r.reason or "").startswith(ABORTED_BY_OPERATOR) else S.ROLLED_BACK
        # a device given an adapter reports its base all along: it is back once it dropped the adapter
        holding = onwire.adapters_on(self.store, [d.device for d in devs], self.store.rollout_choices(r.id))
        back = {d.device for d in devs if d.device not in holding and want[d.device] in (None, d.version)}
        if len(back) == len(devs):
            kept = [d.device for d in devs if want[d.device] is None and d.version == r.version]
            msg = f"devices are back on what they ran before: {r.reason}"
            if kept:
                msg += f" ({', '.join(kept[:5])} had no earlier version and keep {r.version})"
            self._finish(r, final, msg)
            return
        if time.time() - (r.phase_started or r.created) > self._plan(r)["device_timeout_s"]:
            self._finish(
                r,
                final,
                f"not every device came back within the device timeout: {self._late(devs, want, back)}"
                + (f" (still on the adapter: {', '.join(sorted(holding)[:10])})" if holding else "")
                + f"; {r.reason}",
            )

    def _finish(self, r: RolloutRow, state: RolloutState, message: str) -> None:
        devs = self.store.rollout_devices(r.id)
        done = onwire.converged(self.store, r, [(d.device, d.version) for d in devs], self.store.rollout_choices(r.id))
        self.store.update_plan(
            r.id,
            final={
                "devices": len(devs),
                "on_new_version": len(done),
                "versions": _count(d.version for d in devs),
                "at": time.time(),
            },
            stalled=None,
        )
        self._set(r, state, message, phase_started=False)


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v or "none"] = out.get(v or "none", 0) + 1
    return out


def _fmt(summary: MetricSummary) -> str:
    keys = ("count", "p95_latency_ms", "error_rate", "mean_logprob", "tokens_per_second")
    return ", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary[k], float) else f"{k}={summary[k]}" for k in keys)

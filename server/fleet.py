"""What operators see of the fleet: each device's desired vs running version, drift, rejected
versions and last update error (:func:`device_views`), and the Prometheus exposition
(:func:`prometheus_text`): one series per label set, per group, version and rollout."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from server.gate import GATE_METRICS
from server.store import Store

_STALE_S = 180.0


def device_views(store: Store, director: Any | None, group: str | None = None) -> list[dict[str, Any]]:
    """Registry rows plus ``desired`` (and where it comes from), ``drift``, ``rejected``,
    ``last_error``."""
    current = director.assignments() if director is not None else {}
    reports = store.update_reports()
    out = []
    for d in store.devices(group=group):
        a = director.desired(d, current) if director is not None else None
        rep = reports.get(d.id, {})
        desired = a.version if a is not None else None
        out.append(
            {
                **d.to_dict(),
                "desired": desired,
                "desired_from": f"{a.scope}:{a.subject}" if a is not None and desired else None,
                "assignment_serial": a.serial if a is not None else None,
                "drift": desired is not None and d.version != desired,
                "rejected": rep.get("rejected") or [],
                "last_error": rep.get("last_error"),
            }
        )
    return out


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str, samples: dict[tuple[tuple[str, str], ...], float]) -> None:
        """One family; ``samples`` is keyed by its sorted label set, so no series repeats."""
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, v in sorted(samples.items()):
            lab = ",".join(f'{k}="{_esc(val)}"' for k, val in labels)
            self.lines.append(f"{name}{{{lab}}} {_num(v)}" if lab else f"{name} {_num(v)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _labels(**kw: Any) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, str(v)) for k, v in kw.items()))


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(int(v))


def prometheus_text(store: Store, director: Any | None = None) -> str:
    """The server's ``/metrics`` (checked with ``promtool check metrics`` in the tests)."""
    from server.rollout import ACTIVE, status

    x = _Exposition()
    views = device_views(store, director)
    x.metric(
        "edgellm_devices",
        "gauge",
        "Known devices per group.",
        dict(Counter(_labels(group=v["group"]) for v in views)) or {(): 0},
    )
    x.metric(
        "edgellm_devices_online",
        "gauge",
        "Devices online (birth seen, no death since) per group.",
        {
            _labels(group=g): sum(1 for v in views if v["group"] == g and v["online"])
            for g in {v["group"] for v in views}
        }
        or {(): 0},
    )
    x.metric(
        "edgellm_devices_by_version",
        "gauge",
        "Devices per group and reported model version.",
        dict(Counter(_labels(group=v["group"], version=v["version"] or "none") for v in views)),
    )
    x.metric(
        "edgellm_devices_desired",
        "gauge",
        "Devices per group and assigned (desired) version.",
        dict(Counter(_labels(group=v["group"], version=v["desired"] or "none") for v in views)),
    )
    x.metric(
        "edgellm_devices_drift",
        "gauge",
        "Devices whose running version differs from the assigned one.",
        {_labels(group=g): sum(1 for v in views if v["group"] == g and v["drift"]) for g in {v["group"] for v in views}}
        or {(): 0},
    )
    x.metric(
        "edgellm_devices_update_error",
        "gauge",
        "Devices whose last update failed, per group.",
        {
            _labels(group=g): sum(1 for v in views if v["group"] == g and v["last_error"])
            for g in {v["group"] for v in views}
        }
        or {(): 0},
    )
    counters = store.counters()
    x.metric(
        "edgellm_ingest_messages_total",
        "counter",
        "Telemetry messages by outcome.",
        {_labels(outcome=k): v for k, v in counters.items()},
    )
    x.metric(
        "edgellm_ingest_quarantine_rows",
        "gauge",
        "Refused telemetry messages kept for inspection.",
        {(): store.quarantine_size()},
    )
    x.metric(
        "edgellm_rollouts",
        "gauge",
        "Rollouts by state.",
        {_labels(state=s): n for s, n in store.rollout_counts().items()},
    )
    summ = {s.key: s for s in store.series(by="version", since=time.time() - 300, bucket_s=10**9)}
    x.metric(
        "edgellm_latency_p95_seconds",
        "gauge",
        "Inference p95 latency over the last 5 minutes, by version.",
        {_labels(version=k): s.p95_latency_ms / 1000.0 for k, s in summ.items() if s.p95_latency_ms is not None},
    )
    x.metric(
        "edgellm_error_rate",
        "gauge",
        "Inference error rate over the last 5 minutes, by version.",
        {_labels(version=k): s.error_rate for k, s in summ.items() if s.error_rate is not None},
    )
    _rollout_metrics(x, status(store)[:50], ACTIVE)
    return x.text()


def _rollout_metrics(x: _Exposition, rows: list[dict[str, Any]], active: tuple[Any, ...]) -> None:
    """Per rollout (the newest 50): active flag by state, stage, devices on target, samples and
    the gate's current values."""

    def lab(r: dict[str, Any], **kw: Any) -> tuple[tuple[str, str], ...]:
        return _labels(rollout=r["id"], group=r["group"], version=r["version"], **kw)

    x.metric(
        "edgellm_rollout_state",
        "gauge",
        "1 for the state each rollout is in.",
        {lab(r, state=r["state"]): 1 for r in rows},
    )
    x.metric(
        "edgellm_rollout_active",
        "gauge",
        "1 while the rollout is active.",
        {lab(r): int(r["state"] in active) for r in rows},
    )
    x.metric("edgellm_rollout_stage", "gauge", "Current stage (0 is the canary).", {lab(r): r["stage"] for r in rows})
    x.metric("edgellm_rollout_devices", "gauge", "Devices in the rollout.", {lab(r): r["devices"] for r in rows})
    x.metric(
        "edgellm_rollout_devices_on_target",
        "gauge",
        "Devices of the rollout running its version.",
        {lab(r): r["on_new_version"] for r in rows},
    )
    x.metric(
        "edgellm_rollout_samples",
        "gauge",
        "Inferences the gate has seen in the current bake.",
        {lab(r): r["samples"] for r in rows if r["samples"] is not None},
    )
    x.metric(
        "edgellm_rollout_gate_value",
        "gauge",
        "The gate's current values in the current bake.",
        {
            lab(r, metric=m): r["gate_values"][m]
            for r in rows
            if r["gate_values"]
            for m in GATE_METRICS
            if r["gate_values"].get(m) is not None
        },
    )

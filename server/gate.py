"""The rollout gate (``"p95_latency_ms<=800,error_rate<=0.01,mean_logprob>=-2.5"``) and the
canary share, parsed once and checked against a metrics summary."""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable
from typing import Any

from server.errors import RolloutError

GATE_METRICS = ("p95_latency_ms", "p50_latency_ms", "error_rate", "mean_logprob", "tokens_per_second")
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_CLAUSE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*(-?[0-9.eE+-]+)\s*$")
_GATE_HINT = "write e.g. --gate 'p95_latency_ms<=800,error_rate<=0.01,mean_logprob>=-2.5'"


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
                raise RolloutError(f"gate clause {part.strip()!r} is not METRIC OP NUMBER", hint=_GATE_HINT)
            metric, op, num = m.groups()
            if metric not in GATE_METRICS:
                raise RolloutError(f"gate metric {metric!r} is unknown", hint=f"use one of {', '.join(GATE_METRICS)}")
            try:
                threshold = float(num)
            except ValueError:
                raise RolloutError(f"gate threshold {num!r} is not a number", hint=_GATE_HINT) from None
            if not math.isfinite(threshold):
                raise RolloutError(f"gate threshold {num!r} is not finite", hint=_GATE_HINT)
            out.append(Clause(metric, op, threshold))
        return cls(tuple(out))

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.clauses)

    def broken(self, summary: Any) -> list[str]:
        """Reasons the summary (a mapping or a :class:`~server.store.MetricSummary`) breaks the
        gate; metrics absent from the summary are skipped."""
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
        raise RolloutError(f"canary share {v}% must be in (0, 100]", hint="write e.g. --canary 10%")
    return v

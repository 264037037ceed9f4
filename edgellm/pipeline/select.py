"""Choose, for each hardware profile, the candidate that fits, is fast enough and loses least.

For every (candidate, profile) pair a :class:`Verdict` records the checks, in this order:

1. the profile has the candidate's runtime (``llama.cpp`` for GGUF, ``onnxruntime`` for ONNX);
2. memory: weights + KV cache + compute buffers at the profile's context length, plus
   ``headroom`` (default 10%), fits the profile's usable RAM (``ram × model_share``);
3. speed: the roofline prediction (efficiency measured here × profile bandwidth ÷ bytes per
   token) meets the profile's ``min_tokens_per_second`` (or the operator's override);
4. quality: the perplexity increase vs the unquantized model is within ``max_quality_loss``;
5. a pinned format excludes every other format.

Among the candidates that pass, the one with the lowest KL divergence from the unquantized model
wins (ties: smaller peak memory). If none passes, the profile is refused with a message that says
what would fit (or why nothing can: no runtime on the device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from edgellm.pipeline.candidates import Measurement

MIB = 1024 * 1024


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB" if n < 1024 * MIB else f"{n / 1024 / MIB:.2f} GiB"


@dataclasses.dataclass(frozen=True)
class Budget:
    """Operator constraints on top of each profile's own targets."""

    headroom: float = 0.10
    max_quality_loss: float | None = None  # relative perplexity increase, 0.05 = +5%
    min_tokens_per_second: float | None = None  # overrides the profile's target when set
    pin_format: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Verdict:
    fmt: str
    runtime_ok: bool
    peak_bytes: int
    required_bytes: int  # peak × (1 + headroom)
    usable_bytes: int
    fits: bool
    predicted_tokens_per_second: float
    target_tokens_per_second: float
    fast_enough: bool
    quality_loss: float
    kl_divergence: float
    quality_ok: bool
    pinned_ok: bool
    memory: dict[str, int]
    reasons: list[str] = dataclasses.field(default_factory=list)
    chosen: bool = False

    @property
    def eligible(self) -> bool:
        return self.runtime_ok and self.fits and self.fast_enough and self.quality_ok and self.pinned_ok

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eligible"] = self.eligible
        return d


@dataclasses.dataclass
class Selection:
    profile: str
    chosen: str | None
    verdicts: list[Verdict]
    refusal: str | None = None

    def verdict(self, fmt: str) -> Verdict:
        return next(v for v in self.verdicts if v.fmt == fmt)

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "chosen": self.chosen,
            "refusal": self.refusal,
            "verdicts": [v.to_dict() for v in self.verdicts],
        }


def context_for(m: Measurement, profile: Any) -> int:
    """The profile's context length, capped at what the model was trained for."""
    limit = m.extra.get("max_context_length")
    return min(profile.context_length, int(limit)) if limit else profile.context_length


def judge(m: Measurement, profile: Any, budget: Budget) -> Verdict:
    ctx = context_for(m, profile)
    mem = m.memory.at(ctx)
    usable = int(profile.usable_ram_bytes)
    required = int(mem["peak_bytes"] * (1.0 + budget.headroom))
    target = budget.min_tokens_per_second if budget.min_tokens_per_second is not None else profile.min_tokens_per_second
    tps = m.predicted_tokens_per_second(profile.bandwidth_gbps)
    v = Verdict(
        fmt=m.fmt,
        runtime_ok=m.runtime_name in profile.runtimes,
        peak_bytes=mem["peak_bytes"],
        required_bytes=required,
        usable_bytes=usable,
        fits=required <= usable,
        predicted_tokens_per_second=tps,
        target_tokens_per_second=float(target),
        fast_enough=tps >= target,
        quality_loss=m.quality_loss,
        kl_divergence=m.kl_divergence,
        quality_ok=budget.max_quality_loss is None or m.quality_loss <= budget.max_quality_loss,
        pinned_ok=budget.pin_format is None or budget.pin_format == m.fmt,
        memory=mem,
    )
    if not v.runtime_ok:
        v.reasons.append(f"{profile.name} has no {m.runtime_name}")
    if not v.fits:
        v.reasons.append(
            f"needs {_mib(required)} with {budget.headroom:.0%} headroom "
            f"(weights {_mib(mem['weights_bytes'])} + KV {_mib(mem['kv_cache_bytes'])} at "
            f"{ctx} ctx + compute {_mib(mem['compute_bytes'])} + runtime "
            f"{_mib(mem['runtime_bytes'])}), "
            f"usable RAM is {_mib(usable)}"
        )
    if not v.fast_enough:
        v.reasons.append(f"predicted {tps:.1f} tok/s < target {target:g} tok/s")
    if not v.quality_ok:
        v.reasons.append(f"perplexity +{m.quality_loss:.2%} > max quality loss {budget.max_quality_loss:.2%}")
    if not v.pinned_ok:
        v.reasons.append(f"format pinned to {budget.pin_format}")
    return v


def _what_would_fit(profile: Any, ms: list[Measurement], verdicts: list[Verdict], budget: Budget) -> str:
    parts = []
    if not profile.runtimes:
        parts.append(f"{profile.name} lists no LLM runtime (needs llama.cpp or onnxruntime)")
    smallest = min(verdicts, key=lambda v: v.required_bytes)
    m = next(x for x in ms if x.fmt == smallest.fmt)
    usable = profile.usable_ram_bytes
    if not smallest.fits:
        # how big a model of the same shape-class would fit: scale weights to the remaining budget
        room = (
            usable / (1.0 + budget.headroom)
            - smallest.memory["kv_cache_bytes"]
            - smallest.memory["compute_bytes"]
            - smallest.memory["runtime_bytes"]
        )
        bpw = 8.0 * m.memory.weights_bytes / max(1, m.extra.get("n_params") or m.memory.weights_bytes)
        if room > 0 and m.extra.get("n_params"):
            parts.append(
                f"the smallest candidate ({smallest.fmt}) needs {_mib(smallest.required_bytes)} but only "
                f"{_mib(usable)} is usable; a model of at most ~{room * 8 / bpw / 1e6:.1f}M parameters "
                f"at {smallest.fmt} would fit"
            )
        else:
            parts.append(
                f"the smallest candidate ({smallest.fmt}) needs {_mib(smallest.required_bytes)} but only "
                f"{_mib(usable)} is usable: even the runtime, KV cache and buffers at {smallest.memory['context_length']} ctx "
                f"do not fit, so no model of this architecture fits"
            )
    else:
        parts.append(f"{smallest.fmt} would fit in memory ({_mib(smallest.required_bytes)} of {_mib(usable)})")
    fastest = max(verdicts, key=lambda v: v.predicted_tokens_per_second)
    if not fastest.fast_enough:
        parts.append(
            f"the fastest candidate ({fastest.fmt}) is predicted at "
            f"{fastest.predicted_tokens_per_second:.1f} tok/s, below {fastest.target_tokens_per_second:g}"
        )
    return "; ".join(parts)


def select(profile: Any, measurements: Iterable[Measurement], budget: Budget = Budget()) -> Selection:
    ms = list(measurements)
    verdicts = [judge(m, profile, budget) for m in ms]
    ok = [v for v in verdicts if v.eligible]
    if not ms:
        return Selection(profile.name, None, [], refusal="no candidates were built")
    if not ok:
        return Selection(
            profile.name,
            None,
            verdicts,
            refusal=f"nothing fits {profile.name}: " + _what_would_fit(profile, ms, verdicts, budget),
        )
    best = min(ok, key=lambda v: (round(v.kl_divergence, 6), v.peak_bytes))
    best.chosen = True
    for v in ok:
        if v is not best:
            v.reasons.append(
                f"fits, but loses more than {best.fmt} (KL {v.kl_divergence:.4f} vs {best.kl_divergence:.4f})"
                if v.kl_divergence > best.kl_divergence
                else f"as good as {best.fmt} but needs more memory"
            )
    return Selection(profile.name, best.fmt, verdicts)

"""What a candidate artifact costs and loses: its memory model and its measurements (JSON, cached)."""

from __future__ import annotations

import dataclasses
from typing import Any

from edgellm.formats import RUNTIME_NAMES


@dataclasses.dataclass
class MemoryModel:
    """Bytes a loaded candidate needs: weights + KV cache(ctx) + compute buffers(ctx) + runtime.

    ``runtime_bytes`` is what the runtime holds beyond those, calibrated here against the peak
    RSS the agent's health check measures (see docs/gguf.md): a few MiB for llama.cpp; for
    onnxruntime a share of the weights (pre-packed copies) plus its session and arena.
    """

    weights_bytes: int
    kv_bytes_per_position: int  # all layers, K and V, at the cache dtype the runtime uses
    compute_base_bytes: int  # per-ubatch activations independent of context
    compute_bytes_per_position: int  # per-ubatch attention scores that grow with context
    runtime_bytes: int = 0

    def at(self, context_length: int) -> dict[str, int]:
        kv = self.kv_bytes_per_position * context_length
        compute = self.compute_base_bytes + self.compute_bytes_per_position * context_length
        return {
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": kv,
            "compute_bytes": compute,
            "runtime_bytes": self.runtime_bytes,
            "context_length": context_length,
            "peak_bytes": self.weights_bytes + kv + compute + self.runtime_bytes,
        }


@dataclasses.dataclass
class Measurement:
    """Everything measured about one candidate (JSON-serialisable; cached)."""

    fmt: str
    runtime: str  # an artifact kind: edgellm.formats.RUNTIMES
    artifact: str  # path to the artifact file
    size_bytes: int
    memory: MemoryModel
    bytes_per_token: int  # weight bytes streamed per decoded token
    perplexity: float
    reference_perplexity: float
    kl_divergence: float
    top1_agreement: float
    eval_tokens: int
    decode_tokens_per_second: float
    efficiency: float  # decode tok/s × bytes_per_token ÷ bandwidth here
    bandwidth_here_gbps: float
    export: dict[str, Any] = dataclasses.field(default_factory=dict)
    cache_key: str = ""
    cached: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def runtime_name(self) -> str:
        return RUNTIME_NAMES[self.runtime]

    @property
    def quality_loss(self) -> float:
        """Relative perplexity increase vs the unquantized model (0.02 = +2%), floored at 0."""
        return max(0.0, self.perplexity / self.reference_perplexity - 1.0)

    def predicted_tokens_per_second(self, bandwidth_gbps: float) -> float:
        """Roofline: efficiency measured here × the device's bandwidth ÷ bytes read per token."""
        return min(1.0, self.efficiency) * bandwidth_gbps * 1e9 / max(1, self.bytes_per_token)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(self.extra)
        d.pop("extra")
        d["quality_loss"] = self.quality_loss
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names and k != "extra"}
        known["memory"] = MemoryModel(**d["memory"])
        extra = {k: v for k, v in d.items() if k not in names and k != "quality_loss"}
        return cls(**known, extra=extra)

"""Per-interval aggregation of inference metrics (count, p50/p95 latency, tokens/s, errors,
mean logprob of generated tokens, prompt length stats)."""

from __future__ import annotations

import math
import threading
from typing import Any


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    if not sorted_values:
        raise ValueError("no values")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return float(sorted_values[k])


class InferenceAggregator:
    """Thread-safe accumulator; ``drain()`` returns the interval's summary and resets."""

    def __init__(self, max_samples: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._max = max_samples
        self._reset()

    def _reset(self) -> None:
        self._lat: list[float] = []
        self._count = 0
        self._errors = 0
        self._tps: list[float] = []
        self._lp_sum = 0.0
        self._lp_n = 0
        self._prompt_sum = 0
        self._prompt_max = 0
        self._completion = 0

    def add(
        self,
        *,
        latency_ms: float,
        prompt_tokens: int,
        completion_tokens: int,
        tokens_per_second: float,
        mean_logprob: float | None = None,
        error: bool = False,
    ) -> None:
        with self._lock:
            self._count += 1
            if error:
                self._errors += 1
            if len(self._lat) < self._max:
                self._lat.append(float(latency_ms))
                if tokens_per_second is not None:
                    self._tps.append(float(tokens_per_second))
            if mean_logprob is not None:
                self._lp_sum += float(mean_logprob)
                self._lp_n += 1
            self._prompt_sum += int(prompt_tokens)
            self._prompt_max = max(self._prompt_max, int(prompt_tokens))
            self._completion += int(completion_tokens)

    def drain(self) -> dict[str, Any] | None:
        """Summary of everything added since the last drain, or None if nothing was."""
        with self._lock:
            if self._count == 0:
                return None
            lat = sorted(self._lat)
            out = {
                "count": self._count,
                "errors": self._errors,
                "p50_latency_ms": percentile(lat, 50) if lat else None,
                "p95_latency_ms": percentile(lat, 95) if lat else None,
                "tokens_per_second": sum(self._tps) / len(self._tps) if self._tps else None,
                "mean_logprob": self._lp_sum / self._lp_n if self._lp_n else None,
                "prompt_tokens_mean": self._prompt_sum / self._count,
                "prompt_tokens_max": self._prompt_max,
                "completion_tokens": self._completion,
            }
            self._reset()
            return out

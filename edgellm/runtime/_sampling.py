"""Token sampling over one logits vector (numpy only; shared by the runtime backends).

``Sampler(params).sample(logits) -> (token_id, logprob)``: greedy when temperature is 0,
otherwise temperature -> top-k -> top-p (nucleus) -> draw with a seeded generator.
The logprob is that of the chosen token under the model's own distribution
(``log_softmax(logits)``, before temperature/top-k/top-p), as OpenAI's API reports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # base imports this module
    from edgellm.runtime.base import GenerationParams


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64, copy=False)
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


class Sampler:
    """Stateful sampler for one generation (its RNG advances with each draw)."""

    def __init__(self, params: GenerationParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray, raw: np.ndarray | None = None) -> tuple[int, float]:
        """Draw from ``logits``; the logprob is under ``raw`` (the unconstrained logits) when given."""
        logits = np.asarray(logits).reshape(-1)
        lp = log_softmax(logits if raw is None else np.asarray(raw).reshape(-1))
        p = self.params
        if p.temperature == 0.0:
            tok = int(np.argmax(logits))
            return tok, float(lp[tok])
        scaled = logits.astype(np.float64) / p.temperature
        order = np.argsort(-scaled, kind="stable")
        if p.top_k and p.top_k > 0:
            order = order[: p.top_k]
        s = scaled[order]
        probs = np.exp(s - s.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            cum = np.cumsum(probs)
            keep = int(np.searchsorted(cum, p.top_p) + 1)  # smallest prefix with mass >= top_p
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        tok = int(order[self.rng.choice(len(order), p=probs)])
        return tok, float(lp[tok])


def sample(logits: np.ndarray, params: GenerationParams, rng: np.random.Generator | None = None) -> tuple[int, float]:
    """One-off draw (a fresh Sampler unless ``rng`` is given)."""
    s = Sampler(params)
    if rng is not None:
        s.rng = rng
    return s.sample(logits)


class StopBuffer:
    """Releases streamed text, holding back any tail that could be the start of a stop sequence."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to release now, whether a stop sequence was hit — text before it is released)."""
        self.pending += text
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

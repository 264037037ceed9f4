"""The one interface every inference backend implements.

A :class:`Runtime` owns one loaded model and one context. It is **not** thread-safe:
callers (the agent's request queue) must serialise generations on it.

Backends (``edgellm.runtime.onnx``, ``edgellm.runtime.llamacpp``) import their native
library lazily, inside ``load``; importing this module imports neither torch nor any runtime.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Literal, TypeVar

import numpy as np

from edgellm.errors import GenerationError, ModelLoadError, PromptTooLongError, RuntimeFailure
from edgellm.runtime._sampling import Sampler, StopBuffer

__all__ = ["Completion", "GenerationError", "GenerationParams", "ModelLoadError", "PromptTooLongError",
           "Runtime", "RuntimeFailure", "TextDecoder", "TokenEvent", "render_chat", "runtime_error"]


E = TypeVar("E", bound=RuntimeFailure)
R = TypeVar("R", bound="Runtime")


def runtime_error(cls: type[E], message: str, hint: str) -> E:
    """Build a runtime error with its hint (what to do next)."""
    return cls(message, hint=hint)


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 => disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError("temperature must be within [0, 5]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be within (0, 1]")


FinishReason = Literal["stop", "length"]


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token as it is streamed out.

    ``text`` is the text this token adds (may be empty while a multi-byte UTF-8 character
    is incomplete); ``finish_reason`` is set on the last event only.
    """

    token_id: int
    text: str
    logprob: float | None
    finish_reason: FinishReason | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    prompt_tokens: int
    finish_reason: FinishReason


class TextDecoder(abc.ABC):
    """Turns generated token ids into text as they come, never splitting a UTF-8 character."""

    @abc.abstractmethod
    def push(self, token: int) -> str:
        """Text this token completes (empty while a multi-byte character is incomplete)."""

    @abc.abstractmethod
    def finish(self) -> str:
        """Whatever is still held back at the end of the generation."""


class Runtime(abc.ABC):
    """A loaded model that can tokenize, score and generate.

    Backends implement the tokenizer, :attr:`context_length`, and the evaluation hooks
    (``_prefill``, ``_step``, ``_all_logits``, ``_is_end``, ``_text_decoder``); the generation
    loop, input checks, scoring and benchmarking below are shared, so every backend streams,
    samples, stops and reports log-probabilities the same way. The hooks, :attr:`n_vocab` and
    :meth:`memory_bytes` raise ``NotImplementedError`` until a backend provides them, so a scripted
    stand-in that only overrides :meth:`generate` (the agent's queueing tests) stays small.
    """

    #: the artifact kind this runtime loads (one of :data:`edgellm.formats.RUNTIMES`)
    kind: str = ""
    #: token the benchmark starts from when no prompt is given
    bos_id: int | None = None

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Maximum prompt + generated tokens."""

    @property
    def n_vocab(self) -> int:
        """Vocabulary size (valid token ids are ``0 <= id < n_vocab``)."""
        raise NotImplementedError(f"{type(self).__name__} does not report its vocabulary size")

    @abc.abstractmethod
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids for ``text``. ``special=False`` never parses special tokens out of user text."""

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        ...

    def memory_bytes(self) -> dict[str, int]:
        """``weights_bytes``, ``kv_cache_bytes`` and ``peak_bytes`` the loaded model needs."""
        raise NotImplementedError(f"{type(self).__name__} does not report its memory")

    _closed: bool = False  # set by close(); every call after it raises GenerationError

    # ---- backend hooks ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise runtime_error(GenerationError, "runtime is closed", "load the model again")

    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Evaluate ``ids`` (reusing any cached prefix); return the logits after the last one."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation loop")

    def _step(self, token: int) -> np.ndarray:
        """Append one token to the evaluated sequence; return the logits after it."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation loop")

    def _all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits of every position of ``ids`` from a fresh evaluation, shape (len(ids), vocab)."""
        raise NotImplementedError(f"{type(self).__name__} cannot score sequences")

    def _is_end(self, token: int) -> bool:
        """True for an end-of-generation token."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation loop")

    def _text_decoder(self) -> TextDecoder:
        """A fresh decoder for one generation's tokens."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation loop")

    # ---- checks -------------------------------------------------------------------------------
    def check_ids(self, ids: Sequence[int], what: str = "input") -> list[int]:
        """``ids`` as ints, refusing an empty list and ids outside the vocabulary."""
        out = [int(t) for t in ids]
        if not out:
            raise runtime_error(GenerationError, f"empty {what}", "send at least one token")
        if any(not 0 <= t < self.n_vocab for t in out):
            raise runtime_error(GenerationError, f"{what} token id outside the vocabulary", "tokenize with this model")
        return out

    def check_fits(self, n_prompt: int, params: GenerationParams) -> None:
        """Refuse a prompt that, with ``max_tokens`` generated after it, exceeds the context."""
        if n_prompt + params.max_tokens > self.context_length:
            raise runtime_error(PromptTooLongError,
                                f"prompt of {n_prompt} tokens + max_tokens {params.max_tokens} exceeds the context of "
                                f"{self.context_length}", "shorten the prompt or lower max_tokens")

    def _check_scored(self, ids: Sequence[int]) -> list[int]:
        self._check_open()
        out = self.check_ids(ids)
        if len(out) > self.context_length:
            raise runtime_error(PromptTooLongError, f"{len(out)} tokens for a context of {self.context_length}",
                                "score at most context_length tokens at a time")
        return out

    # ---- scoring and benchmarking ---------------------------------------------------------------
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits for every position of ``ids`` (a fresh evaluation), shape (len(ids), vocab)."""
        return self._all_logits(self._check_scored(ids))

    def batch_logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``[B, S, V]`` for the equal-length rows of ``batch`` ``[B, S]``."""
        return np.stack([self.logits(row) for row in np.asarray(batch, dtype=np.int64).tolist()])

    def last_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits after ``ids`` (reusing the cached prefix)."""
        return self._prefill(self._check_scored(ids))

    def decode_speed(self, n_tokens: int = 64, prompt: Sequence[int] | None = None) -> float:
        """Greedy single-token decode tokens/s after a short prompt, end tokens ignored (a benchmark)."""
        self._check_open()
        ids = self.check_ids(prompt if prompt else [self.bos_id or 0], "prompt")
        n_tokens = max(1, min(n_tokens, self.context_length - len(ids)))
        logits = self._prefill(ids)
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            logits = self._step(int(np.argmax(logits)))
        return n_tokens / (time.perf_counter() - t0)

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], params: GenerationParams) -> Iterator[TokenEvent]:
        """Stream tokens. Closing the iterator early stops generation (client went away)."""
        self._check_open()
        ids = self.check_ids(self.tokenize(prompt) if isinstance(prompt, str) else prompt, "prompt")
        self.check_fits(len(ids), params)
        return self._generate(ids, params)

    def _generate(self, ids: list[int], params: GenerationParams) -> Iterator[TokenEvent]:
        sampler = Sampler(params)  # one sampler for every backend: same seed, same choices
        stops = StopBuffer(params.stop)
        text = self._text_decoder()
        logits = self._prefill(ids)
        for i in range(params.max_tokens):
            tok, logprob = sampler.sample(logits)
            lp = logprob if params.logprobs else None
            if self._is_end(tok):
                yield TokenEvent(tok, stops.flush(), lp, "stop")
                return
            out, hit = stops.push(text.push(tok))
            if hit:
                yield TokenEvent(tok, out, lp, "stop")
                return
            if i == params.max_tokens - 1:
                yield TokenEvent(tok, out + stops.push(text.finish())[0] + stops.flush(), lp, "length")
                return
            yield TokenEvent(tok, out, lp)
            logits = self._step(tok)

    def complete(self, prompt: str | Sequence[int], params: GenerationParams) -> Completion:
        """Run ``generate`` to the end and collect the result."""
        ids: list[int] = []
        lps: list[float] = []
        parts: list[str] = []
        finish: FinishReason = "length"
        n_prompt = len(prompt) if not isinstance(prompt, str) else len(self.tokenize(prompt))
        for ev in self.generate(prompt, params):
            ids.append(ev.token_id)
            lps.append(ev.logprob if ev.logprob is not None else float("nan"))
            parts.append(ev.text)
            if ev.finish_reason:
                finish = ev.finish_reason
        return Completion("".join(parts), tuple(ids), tuple(lps), n_prompt, finish)

    def chat_prompt(self, messages: Sequence[dict]) -> str:
        """Render chat messages as text with the default template (for display and logs).

        To generate, use :meth:`chat_token_ids`: ``generate(str)`` never parses special tokens,
        so role markers in a rendered string would become plain text."""
        return render_chat(messages)

    def chat_token_ids(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """The default chat template as ids: role markers as special tokens, contents as plain
        text, so a user cannot inject role markers or end-of-sequence. Tokenized exactly as the
        build pipeline's ``encode_chat`` does for training."""
        ids = self.tokenize("", add_bos=True)  # [bos] when the model adds one, else []
        for m in messages:
            role = m.get("role", "user")
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"unknown chat role {role!r}: use system, user or assistant")
            ids += self.tokenize(f"<|{role}|>", add_bos=False, special=True)
            ids += self.tokenize("\n" + (m.get("content") or "") + "\n", add_bos=False)
        if add_generation_prompt:
            ids += self.tokenize("<|assistant|>", add_bos=False, special=True)
            ids += self.tokenize("\n", add_bos=False)
        return ids

    def close(self) -> None:
        """Free native resources. Idempotent."""
        self._closed = True

    def __enter__(self: R) -> R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shared_prefix(cached: Sequence[int], ids: Sequence[int]) -> int:
    """How many leading tokens of ``ids`` a cache holding ``cached`` can reuse (never all of
    ``ids``: the last token is always evaluated, to get its logits)."""
    k = 0
    for a, b in zip(cached, ids, strict=False):
        if a != b:
            break
        k += 1
    return min(k, len(ids) - 1)


def render_chat(messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
    """edgellm's default chat template (also written into tokenizer/GGUF metadata).

    ``<|system|>\\n...\\n<|user|>\\n...\\n<|assistant|>\\n`` — role markers are special tokens
    of our tokenizer; user text is tokenized without special-token parsing.
    """
    out = []
    for m in messages:
        role = m.get("role", "user")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {role!r}: use system, user or assistant")
        out.append(f"<|{role}|>\n{m.get('content') or ''}\n")
    if add_generation_prompt:
        out.append("<|assistant|>\n")
    return "".join(out)

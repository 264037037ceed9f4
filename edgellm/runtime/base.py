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
from edgellm.runtime._sampling import Sampler, StopBuffer, log_softmax
from edgellm.runtime.chat import EDGELLM_CHAT_TEMPLATE, ChatTemplate, TemplateError

__all__ = [
    "Completion",
    "GenerationError",
    "GenerationParams",
    "ModelLoadError",
    "PromptTooLongError",
    "Runtime",
    "RuntimeFailure",
    "TextDecoder",
    "TokenEvent",
    "render_chat",
    "runtime_error",
]


E = TypeVar("E", bound=RuntimeFailure)
R = TypeVar("R", bound="Runtime")


def runtime_error(cls: type[E], message: str, hint: str) -> E:
    """Build a runtime error with its hint (what to do next)."""
    return cls(message, hint=hint)


MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 => disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = True
    top_logprobs: int = 0  # also report the N most likely tokens at each step (0..MAX_TOP_LOGPROBS)
    grammar: str | None = None  # a GBNF grammar every generated token must follow (llama.cpp only)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be within [0, {MAX_TOP_LOGPROBS}]")
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
    #: the ``top_logprobs`` most likely (token id, logprob) at this step, most likely first
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    prompt_tokens: int
    finish_reason: FinishReason
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()


class TextDecoder(abc.ABC):
    """Turns generated token ids into text as they come, never splitting a UTF-8 character."""

    @abc.abstractmethod
    def push(self, token: int) -> str:
        """Text this token completes (empty while a multi-byte character is incomplete)."""

    @abc.abstractmethod
    def finish(self) -> str:
        """Whatever is still held back at the end of the generation."""


class Constraint(abc.ABC):
    """A grammar followed during one generation: masks logits, then advances with each token."""

    @abc.abstractmethod
    def apply(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar forbids next set to -inf."""

    @abc.abstractmethod
    def accept(self, token: int) -> None:
        """Advance past the chosen ``token``."""

    def close(self) -> None:  # noqa: B027 - optional hook: most constraints hold nothing native
        """Free native resources."""


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
    #: the model's own chat template (None: edgellm's role markers, for models edgellm trained)
    chat_template: ChatTemplate | None = None
    #: whether :class:`GenerationParams.grammar` can be enforced
    supports_grammar: bool = False
    #: set at load: the model has neither its own template nor edgellm's role markers (chat refused)
    _no_markers: bool = False

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
    def detokenize(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (may be part of a UTF-8 character): what logprobs report."""
        return self.detokenize([token]).encode("utf-8")

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

    def _constraint(self, grammar: str) -> Constraint:
        """A fresh grammar state for one generation (backends with :attr:`supports_grammar`)."""
        raise runtime_error(
            GenerationError,
            f"the {self.kind or 'this'} runtime cannot enforce a grammar",
            "serve the model as GGUF (llama.cpp) for structured output",
        )

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
            raise runtime_error(
                PromptTooLongError,
                f"prompt of {n_prompt} tokens + max_tokens {params.max_tokens} exceeds the context of "
                f"{self.context_length}",
                "shorten the prompt or lower max_tokens",
            )

    def _check_scored(self, ids: Sequence[int]) -> list[int]:
        self._check_open()
        out = self.check_ids(ids)
        if len(out) > self.context_length:
            raise runtime_error(
                PromptTooLongError,
                f"{len(out)} tokens for a context of {self.context_length}",
                "score at most context_length tokens at a time",
            )
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
        constraint = self._constraint(params.grammar) if params.grammar else None
        return self._generate(ids, params, constraint)

    def _generate(
        self, ids: list[int], params: GenerationParams, constraint: Constraint | None = None
    ) -> Iterator[TokenEvent]:
        sampler = Sampler(params)  # one sampler for every backend: same seed, same choices
        stops = StopBuffer(params.stop)
        text = self._text_decoder()
        try:
            logits = self._prefill(ids)
            for i in range(params.max_tokens):
                allowed = constraint.apply(logits) if constraint is not None else logits
                if constraint is not None and not np.isfinite(allowed).any():
                    raise runtime_error(
                        GenerationError,
                        "the grammar allows no next token",
                        "check the grammar or JSON schema: it must accept a finished text",
                    )
                tok, logprob = sampler.sample(allowed, raw=logits)
                lp = logprob if params.logprobs else None
                top = top_logprobs(logits, params.top_logprobs)
                if self._is_end(tok):
                    yield TokenEvent(tok, stops.flush(), lp, "stop", top)
                    return
                if constraint is not None:
                    constraint.accept(tok)
                out, hit = stops.push(text.push(tok))
                if hit:
                    yield TokenEvent(tok, out, lp, "stop", top)
                    return
                if i == params.max_tokens - 1:
                    yield TokenEvent(tok, out + stops.push(text.finish())[0] + stops.flush(), lp, "length", top)
                    return
                yield TokenEvent(tok, out, lp, None, top)
                logits = self._step(tok)
        finally:
            if constraint is not None:
                constraint.close()

    def complete(self, prompt: str | Sequence[int], params: GenerationParams) -> Completion:
        """Run ``generate`` to the end and collect the result."""
        ids: list[int] = []
        lps: list[float] = []
        tops: list[tuple[tuple[int, float], ...]] = []
        parts: list[str] = []
        finish: FinishReason = "length"
        n_prompt = len(prompt) if not isinstance(prompt, str) else len(self.tokenize(prompt))
        for ev in self.generate(prompt, params):
            ids.append(ev.token_id)
            lps.append(ev.logprob if ev.logprob is not None else float("nan"))
            tops.append(ev.top_logprobs)
            parts.append(ev.text)
            if ev.finish_reason:
                finish = ev.finish_reason
        return Completion("".join(parts), tuple(ids), tuple(lps), n_prompt, finish, tuple(tops))

    def _set_chat_template(
        self, source: str | None, special_tokens: dict[str, str], control_texts: Sequence[str]
    ) -> None:
        """Backends call this at load with the template the model carries (see :mod:`.chat`)."""
        if source and source != EDGELLM_CHAT_TEMPLATE:
            self.chat_template = ChatTemplate(source, special_tokens, control_texts)
        else:
            self._no_markers = any(
                len(self.tokenize(f"<|{role}|>", add_bos=False, special=True)) != 1
                for role in ("system", "user", "assistant")
            )

    def chat_prompt(self, messages: Sequence[dict]) -> str:
        """Render chat messages as text with the model's template (for display and logs).

        To generate, use :meth:`chat_token_ids`: ``generate(str)`` never parses special tokens,
        so role markers in a rendered string would become plain text."""
        if self.chat_template is not None:
            return self.chat_template.render(messages)
        return render_chat(messages)

    def chat_token_ids(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """The chat prompt as ids.

        A model with its own template: that template, rendered and tokenized as transformers'
        ``apply_chat_template`` does (:class:`edgellm.runtime.chat.ChatTemplate`). A model edgellm
        trained: role markers as special tokens, contents as plain text, so a user cannot inject
        role markers or end-of-sequence (tokenized exactly as the pipeline's ``encode_chat``)."""
        self._check_open()
        if self.chat_template is not None:
            return self.chat_template.token_ids(
                lambda t, sp: self.tokenize(t, add_bos=False, special=sp),
                messages,
                add_generation_prompt=add_generation_prompt,
            )
        if self._no_markers:
            raise TemplateError(
                "this model has no chat template and no edgellm role markers",
                hint="use the completions endpoint, or add the model's chat_template to "
                "tokenizer_config.json and rebuild",
            )
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


def top_logprobs(logits: np.ndarray, n: int) -> tuple[tuple[int, float], ...]:
    """The ``n`` most likely (token id, logprob) under ``logits``, most likely first."""
    if n <= 0:
        return ()
    lp = log_softmax(np.asarray(logits).reshape(-1))
    n = min(n, lp.shape[0])
    idx = np.argpartition(-lp, n - 1)[:n]
    idx = idx[np.argsort(-lp[idx], kind="stable")]
    return tuple((int(i), float(lp[i])) for i in idx)


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

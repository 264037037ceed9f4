"""The one interface every inference backend implements.

A :class:`Runtime` owns one loaded model and one context. It is **not** thread-safe:
callers (the agent's request queue) must serialise generations on it.

Backends (``edgellm.runtime.onnx``, ``edgellm.runtime.llamacpp``) import their native
library lazily, inside ``load``; importing this module imports neither torch nor any runtime.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Literal

from edgellm.errors import EdgeLLMError


class RuntimeError_(EdgeLLMError):
    """Base of every runtime failure (a model that cannot load or generate)."""


def runtime_error(cls: type[RuntimeError_], message: str, hint: str) -> RuntimeError_:
    """Build a runtime error with its hint (what to do next)."""
    return cls(message, hint=hint)


class ModelLoadError(RuntimeError_):
    """The artifact could not be loaded: missing, malformed, or not what the manifest says."""


class GenerationError(RuntimeError_):
    """A request could not be served (e.g. the prompt does not fit in the context)."""


class PromptTooLongError(GenerationError):
    """The prompt (plus max_tokens) exceeds the model context."""


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


class Runtime(abc.ABC):
    """A loaded model that can tokenize and generate."""

    #: "onnx" or "gguf"
    kind: str = ""

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Maximum prompt + generated tokens."""

    @abc.abstractmethod
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids for ``text``. ``special=False`` never parses special tokens out of user text."""

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        ...

    def check_fits(self, n_prompt: int, params: GenerationParams) -> None:
        """Refuse a prompt that, with ``max_tokens`` generated after it, exceeds the context."""
        if n_prompt + params.max_tokens > self.context_length:
            raise runtime_error(PromptTooLongError,
                                f"prompt of {n_prompt} tokens + max_tokens {params.max_tokens} exceeds the context of "
                                f"{self.context_length}", "shorten the prompt or lower max_tokens")

    @abc.abstractmethod
    def generate(self, prompt: str | Sequence[int], params: GenerationParams) -> Iterator[TokenEvent]:
        """Stream tokens. Closing the iterator early stops generation (client went away)."""

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

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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

"""Structured output and log-probabilities on the OpenAI routes.

- ``response_format`` ``json_object`` / ``json_schema`` becomes a llama.cpp grammar enforced during
  sampling (:mod:`edgellm.runtime.grammar`); a runtime that cannot enforce one (ONNX) answers 400;
- ``logprobs`` / ``top_logprobs`` (chat) and ``logprobs: N`` (completions) are reported in OpenAI's
  shapes, from the model's own distribution (before temperature, top-k/p and the grammar);
- parameters the agent does not implement (``tools``, ``logit_bias``, penalties ...) are refused
  with 400 ``unsupported_parameter``: nothing is accepted and ignored.
"""

from __future__ import annotations

from typing import Any

from agent.errors import ApiProblem
from edgellm.runtime import Runtime, TokenEvent

_HINTS = {
    "tools": "tool calling is not supported by the local API: describe the tool in the prompt and use "
    "response_format json_schema for its arguments",
}


def refuse_unsupported(req: Any) -> None:
    name = req.unsupported()
    if name is not None:
        hint = _HINTS.get(name, "remove it from the request")
        raise ApiProblem(
            400,
            f"parameter {name!r} is not supported by this device: {hint}",
            code="unsupported_parameter",
            param=name,
            hint=hint,
        )


def grammar_of(req: Any, runtime: Runtime | None) -> str | None:
    """The grammar ``response_format`` asks for (None for plain text); 400 if it cannot be enforced."""
    rf = req.response_format
    if rf is None or rf.get("type") in (None, "text"):
        return None
    if runtime is None or not runtime.supports_grammar:
        kind = getattr(runtime, "kind", "") or "this"
        raise ApiProblem(
            400,
            f"response_format {rf.get('type')!r} needs grammar-constrained sampling, which the "
            f"{kind} runtime cannot do: serve the model as GGUF (llama.cpp)",
            code="unsupported_parameter",
            param="response_format",
            hint="serve a GGUF build of the model, or drop response_format",
        )
    from edgellm.runtime.grammar import grammar_for_response_format

    try:
        return grammar_for_response_format(rf)
    except ValueError as e:
        raise ApiProblem(
            400,
            f"invalid response_format: {e}",
            code="invalid_request",
            param="response_format",
            hint="send a JSON schema llama.cpp can turn into a grammar",
        ) from None


def top_n(req: Any, chat: bool) -> tuple[bool, int]:
    """(report logprobs, how many alternatives per token) the request asks for."""
    if chat:
        if req.top_logprobs and not req.logprobs:
            raise ApiProblem(400, "top_logprobs needs logprobs: true", code="invalid_request", param="top_logprobs")
        return bool(req.logprobs), int(req.top_logprobs or 0)
    return req.logprobs is not None, int(req.logprobs or 0)


class Logprobs:
    """Collects the log-probabilities of one answer and renders them as OpenAI does."""

    def __init__(self, runtime: Runtime, chat: bool) -> None:
        self.rt = runtime
        self.chat = chat
        self.events: list[TokenEvent] = []

    def _piece(self, token: int) -> bytes:
        return self.rt.token_bytes(token)

    def _text(self, token: int) -> str:
        return self._piece(token).decode("utf-8", errors="replace")

    def _lp(self, value: float | None) -> float:
        return float(value) if value is not None else -9999.0

    def chat_entry(self, ev: TokenEvent) -> dict[str, Any]:
        b = self._piece(ev.token_id)
        return {
            "token": b.decode("utf-8", errors="replace"),
            "logprob": self._lp(ev.logprob),
            "bytes": list(b),
            "top_logprobs": [
                {"token": self._text(t), "logprob": lp, "bytes": list(self._piece(t))} for t, lp in ev.top_logprobs
            ],
        }

    def block(self, events: list[TokenEvent]) -> dict[str, Any]:
        """The ``logprobs`` object of a choice covering ``events``."""
        if self.chat:
            return {"content": [self.chat_entry(ev) for ev in events]}
        tokens = [self._text(ev.token_id) for ev in events]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [self._lp(ev.logprob) for ev in events],
            "top_logprobs": [{self._text(t): lp for t, lp in ev.top_logprobs} for ev in events],
            "text_offset": offsets,
        }

"""Events of a queued job: the next one for a plain answer, or OpenAI's server-sent event chunks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request

from agent.api.structured import Logprobs
from agent.engine import Job
from agent.errors import ApiProblem


async def next_event(request: Request, q: asyncio.Queue, job: Job) -> tuple[str, Any]:
    """Next event of a non-streamed job; cancels the job if the client goes away meanwhile."""
    try:
        while True:
            try:
                return await asyncio.wait_for(q.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ApiProblem(499, "client closed the request", code="client_closed") from None
    except BaseException:
        job.cancel.set()
        raise


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _chunk(
    head: dict,
    chat: bool,
    text: str | None,
    finish_reason: str | None,
    *,
    role: bool = False,
    logprobs: dict | None = None,
) -> bytes:
    if chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    return _sse({**head, "choices": [choice]})


async def sse_stream(
    q: asyncio.Queue,
    job: Job,
    *,
    chat: bool,
    head: dict,
    include_usage: bool,
    on_end: Callable[[int, dict], None],
    logprobs: Logprobs | None = None,
) -> AsyncIterator[bytes]:
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    status, stats = 499, {}
    try:
        if chat:
            yield _chunk(head, chat, "", None, role=True)
        while True:
            kind, payload = await q.get()
            if kind == "token":
                if logprobs is not None:
                    yield _chunk(head, chat, payload.text, None, logprobs=logprobs.block([payload]))
                elif payload.text:
                    yield _chunk(head, chat, payload.text, None)
            elif kind == "done":
                stats = payload
                fr = stats["finish_reason"] if stats["finish_reason"] in ("stop", "length") else "stop"
                yield _chunk(head, chat, None if chat else "", fr)
                if include_usage:
                    yield _sse(
                        {
                            **head,
                            "choices": [],
                            "usage": {
                                "prompt_tokens": stats["prompt_tokens"],
                                "completion_tokens": stats["completion_tokens"],
                                "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"],
                            },
                        }
                    )
                status = 200
                break
            elif kind == "error":
                status = payload.status
                yield _sse(
                    {"error": {"message": payload.message, "type": payload.type, "param": None, "code": payload.code}}
                )
                break
        yield b"data: [DONE]\n\n"
    finally:
        job.cancel.set()  # a client that went away stops its generation
        on_end(status, stats)

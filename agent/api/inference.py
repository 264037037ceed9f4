"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Generations go through the :class:`~agent.engine.Engine` queue (full -> 429 with Retry-After);
``stream: true`` answers server-sent events in OpenAI's chunk format ending with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from agent.api._common import ApiContext
from agent.api.sse import next_event, sse_stream
from agent.api.structured import Logprobs, grammar_of, refuse_unsupported, top_n
from agent.engine import Job, JobError
from agent.errors import ApiProblem, QueueFull
from agent.schemas import ChatCompletionRequest, CompletionRequest
from edgellm.runtime import GenerationParams


@dataclasses.dataclass
class _Prompt:
    text: str  # what the character limit and the audit log see
    prompt: str | None  # a completion's prompt
    messages: list[dict] | None  # a chat's messages
    max_tokens: int | None


def _model_card(m: Any) -> dict:
    return {
        "id": m.name,
        "object": "model",
        "created": int(m.loaded_at),
        "owned_by": "edgellm",
        "version": m.version,
        "runtime": m.kind,
        "quantization": m.quantization,
        "context_length": m.context_length,
    }


def _model_cards(m: Any) -> list[dict]:
    """The base, then base + each adapter it serves (``"tiny:kitchen"``)."""
    base = _model_card(m)
    served = m.adapters.entries if getattr(m, "adapters", None) is not None else []
    return [base] + [
        {
            **base,
            "id": f"{m.name}:{e.name}",
            "version": e.version,
            "base": m.name,
            "base_version": m.version,
            "adapter": e.name,
        }
        for e in served
    ]


def _adapter_of(m: Any, model: str | None) -> tuple[bool, str | None]:
    """(served?, adapter) for a request's ``model`` field on the served model ``m``."""
    if model in (None, "", "default", m.name, f"{m.name}:{m.version}", f"{m.name}@{m.version}"):
        return True, None
    base, sep, adapter = model.partition(":")
    if sep and base == m.name and getattr(m, "adapters", None) is not None and adapter in m.adapters:
        return True, adapter
    return False, None


def job_problem(e: JobError) -> ApiProblem:
    headers = {"Retry-After": "30"} if e.status == 503 else None
    return ApiProblem(e.status, e.message, code=e.code, kind=e.type, headers=headers)


def _prompt_of(req: Any, chat: bool) -> _Prompt:
    if chat:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return _Prompt("\n".join(m["content"] for m in messages), None, messages, mt)
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiProblem(400, "send exactly one prompt per request", code="invalid_request", param="prompt")
        prompt = prompt[0]
    return _Prompt(prompt, prompt, None, req.max_tokens)


class Generation:
    """Turns a validated request into a queued Job and its HTTP answer."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    def params(self, req: Any, max_tokens: int | None) -> GenerationParams:
        lim = self.ctx.limits
        if req.n not in (None, 1):
            raise ApiProblem(400, "only n=1 is supported", code="unsupported_parameter", param="n")
        refuse_unsupported(req)
        _, n_top = top_n(req, isinstance(req, ChatCompletionRequest))
        mt = max_tokens if max_tokens is not None else lim.default_max_tokens
        if mt > lim.max_tokens:
            raise ApiProblem(
                400,
                f"max_tokens {mt} is over this device's limit of {lim.max_tokens}",
                code="max_tokens_too_large",
                param="max_tokens",
            )
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        m = self.ctx.engine.model
        defaults = dict(m.defaults) if m is not None else {}
        grammar = grammar_of(req, m.runtime if m is not None else None)
        try:
            return GenerationParams(
                max_tokens=mt,
                temperature=req.temperature if req.temperature is not None else float(defaults.get("temperature", 0.0)),
                top_p=req.top_p if req.top_p is not None else float(defaults.get("top_p", 1.0)),
                top_k=req.top_k if req.top_k is not None else int(defaults.get("top_k", 0)),
                seed=req.seed,
                stop=stop,
                top_logprobs=n_top,
                grammar=grammar,
            )
        except (TypeError, ValueError) as e:  # a bundle default out of range
            raise ApiProblem(400, f"invalid generation parameters: {e}", code="invalid_request") from None

    def check_model(self, req: Any) -> str | None:
        """The adapter the request's ``model`` selects (None: the base); 404 if not served here."""
        m = self.ctx.engine.model
        if m is None:
            raise ApiProblem(
                503,
                "no model is installed on this device yet",
                code="model_not_loaded",
                kind="server_error",
                headers={"Retry-After": "30"},
            )
        served, adapter = _adapter_of(m, req.model)
        if not served:
            ids = ", ".join(repr(c["id"]) for c in _model_cards(m))
            raise ApiProblem(
                404,
                f"model {req.model!r} is not served here; this device serves {ids}",
                code="model_not_found",
                param="model",
            )
        return adapter

    def submit(
        self, p: _Prompt, params: GenerationParams, endpoint: str, adapter: str | None = None
    ) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(kind: str, payload: Any) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
                job.cancel.set()

        job = Job(
            params=params,
            sink=sink,
            prompt=p.prompt,
            messages=p.messages,
            endpoint=endpoint,
            clamp_max_tokens=p.max_tokens is None,
            adapter=adapter,
        )
        try:
            self.ctx.engine.submit(job)
        except QueueFull as e:
            self.ctx.metrics.rejected.labels("queue_full").inc()
            raise ApiProblem(
                429,
                "the model is busy: too many queued requests; retry after the given delay",
                code="rate_limit_exceeded",
                kind="rate_limit_error",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        return job, q

    async def run(self, request: Request, t0: float, endpoint: str, *, chat: bool) -> Response:
        ctx = self.ctx
        req = await ctx.read_body(request, ChatCompletionRequest if chat else CompletionRequest)
        p = _prompt_of(req, chat)
        if len(p.text) > ctx.limits.max_prompt_chars:
            ctx.metrics.rejected.labels("prompt_too_long").inc()
            raise ApiProblem(
                400,
                f"prompt has {len(p.text)} characters; the limit is {ctx.limits.max_prompt_chars}",
                code="context_length_exceeded",
                param="messages" if chat else "prompt",
            )
        adapter = self.check_model(req)
        params = self.params(req, p.max_tokens)
        model = ctx.engine.model
        logprobs = Logprobs(model.runtime, chat) if top_n(req, chat)[0] and model is not None else None
        job, q = self.submit(p, params, endpoint, adapter)
        if p.messages is not None:
            ctx.hooks.on_chat(p.messages)
        audit: dict[str, Any] = {"prompt": p.text, "user": req.user}
        request.state.audit = audit
        kind, start = await next_event(request, q, job)
        if kind == "error":
            raise job_problem(start)
        audit.update(model=start["model"], model_version=start["version"], prompt_tokens=start["prompt_tokens"])
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            "created": int(time.time()),
            "model": start["model"],
            "system_fingerprint": f"edgellm-{start['version']}",
        }
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)

            def on_end(status: int, stats: dict) -> None:
                ctx.finish(
                    request,
                    endpoint,
                    status,
                    t0,
                    **audit,
                    completion_tokens=stats.get("completion_tokens"),
                    stream=True,
                )

            return StreamingResponse(
                sse_stream(q, job, chat=chat, head=head, include_usage=usage, on_end=on_end, logprobs=logprobs),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self._collect(request, q, job, head, audit, chat=chat, logprobs=logprobs)

    async def _collect(
        self,
        request: Request,
        q: asyncio.Queue,
        job: Job,
        head: dict,
        audit: dict,
        *,
        chat: bool,
        logprobs: Logprobs | None,
    ) -> Response:
        parts: list[str] = []
        events: list = []
        while True:
            kind, payload = await next_event(request, q, job)
            if kind == "token":
                parts.append(payload.text)
                events.append(payload)
            elif kind == "done":
                stats = payload
                break
            elif kind == "error":
                job.cancel.set()
                raise job_problem(payload)
        text = "".join(parts)
        usage = {
            "prompt_tokens": stats["prompt_tokens"],
            "completion_tokens": stats["completion_tokens"],
            "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"],
        }
        fr = stats["finish_reason"] if stats["finish_reason"] in ("stop", "length") else "stop"
        lp = logprobs.block(events) if logprobs is not None else None
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": lp,
                "finish_reason": fr,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": fr}
        audit["completion_tokens"] = stats["completion_tokens"]
        return JSONResponse(
            {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice], "usage": usage}
        )


def router(ctx: ApiContext) -> APIRouter:
    r = APIRouter()
    gen = Generation(ctx)

    @r.get("/v1/models")
    @ctx.endpoint("/v1/models")
    async def list_models(request: Request, t0: float) -> Response:
        m = ctx.engine.model
        return JSONResponse({"object": "list", "data": _model_cards(m) if m else []})

    @r.get("/v1/models/{model_id}")
    @ctx.endpoint("/v1/models/{id}")
    async def get_model(request: Request, t0: float) -> Response:
        m = ctx.engine.model
        model_id = request.path_params["model_id"]
        card = next((c for c in _model_cards(m) if c["id"] == model_id), None) if m is not None else None
        if card is None:
            raise ApiProblem(404, f"model {model_id[:200]!r} is not served here", code="model_not_found")
        return JSONResponse(card)

    @r.post("/v1/completions")
    @ctx.endpoint("/v1/completions")
    async def completions(request: Request, t0: float) -> Response:
        return await gen.run(request, t0, "/v1/completions", chat=False)

    @r.post("/v1/chat/completions")
    @ctx.endpoint("/v1/chat/completions")
    async def chat_completions(request: Request, t0: float) -> Response:
        return await gen.run(request, t0, "/v1/chat/completions", chat=True)

    return r

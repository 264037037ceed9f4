"""The local OpenAI-compatible API (FastAPI).

Every route except ``/healthz`` needs ``Authorization: Bearer <DIR/api-token>`` (constant-time
compare). Bodies are capped in bytes before parsing and validated with strict types; errors are
OpenAI-shaped JSON (``{"error": {"message", "type", "param", "code"}}``). Generations go through
the :class:`~agent.engine.Engine` queue; ``stream: true`` answers server-sent events in OpenAI's
chunk format ending with ``data: [DONE]``. Every request writes one audit line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.audit import AuditLog
from agent.config import Limits
from agent.engine import Engine, Job, JobError, QueueFull
from agent.metrics import CONTENT_TYPE_LATEST, Metrics
from agent.schemas import ChatCompletionRequest, CompletionRequest, UpdateRequest
from edgellm.runtime import GenerationParams

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str, type: str = "invalid_request_error",
                 param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


@dataclasses.dataclass
class AdminHooks:
    status: Callable[[], dict] = lambda: {}
    request_update: Callable[[dict], None] = lambda desired: None
    on_chat: Callable[[list], object] = lambda messages: None   # --learn-from-use keeps user messages


def _caller(request: Request) -> str:
    c = request.client
    if c is None or not c.host:
        return "unix"
    return f"{c.host}:{c.port}"


def create_app(*, engine: Engine, token: str, limits: Limits, metrics: Metrics | None = None,
               audit: AuditLog | None = None, hooks: AdminHooks | None = None) -> FastAPI:
    metrics = metrics or Metrics()
    hooks = hooks or AdminHooks()
    app = FastAPI(title="edgellm-agent", docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {token}".encode()

    def check_auth(request: Request) -> None:
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            metrics.rejected.labels("auth").inc()
            raise ApiError(401, "missing or wrong API token: send 'Authorization: Bearer <token>' with the "
                                "token from the agent's api-token file", code="invalid_api_key")

    def finish(request: Request, endpoint: str, status: int, t0: float, **fields: Any) -> None:
        dt = time.monotonic() - t0
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(dt)
        if audit is not None:
            try:
                audit.write(caller=_caller(request), endpoint=endpoint, status=status, duration_s=dt, **fields)
            except Exception:  # noqa: BLE001 - a full disk must not take the API down
                log.exception("audit log write failed")

    async def read_body(request: Request, model: type) -> Any:
        cl = request.headers.get("content-length")
        if cl is not None and (not cl.isdigit() or int(cl) > limits.max_body_bytes):
            raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", code="request_too_large")
        try:
            return model.model_validate_json(bytes(body) or b"{}")
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err.get("loc", ()))
            if err.get("type") == "json_invalid":
                raise ApiError(400, "request body is not valid JSON", code="invalid_json") from None
            raise ApiError(400, f"invalid request: {loc or 'body'}: {err.get('msg')}", code="invalid_request",
                           param=loc or None) from None

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown routes / wrong methods: OpenAI-shaped, audited, one metrics label for all of them
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        finish(request, "(other)", exc.status_code, time.monotonic(), error=code, path=request.url.path[:200])
        return ApiError(exc.status_code, f"{request.method} {request.url.path[:200]}: {exc.detail}",
                        code=code).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s", request.url.path)
        return ApiError(500, "internal error in the agent; see its log", code="internal_error",
                        type="server_error").response()

    def endpoint_wrapper(name: str, needs_auth: bool = True):
        def deco(fn):
            async def wrapped(request: Request):
                t0 = time.monotonic()
                try:
                    if needs_auth:
                        check_auth(request)
                    resp = await fn(request, t0)
                except ApiError as e:
                    finish(request, name, e.status, t0, error=e.code, **getattr(request.state, "audit", {}))
                    return e.response()
                if not isinstance(resp, StreamingResponse):  # a stream audits itself when it ends
                    finish(request, name, resp.status_code, t0, **getattr(request.state, "audit", {}))
                return resp
            wrapped.__name__ = fn.__name__
            return wrapped
        return deco

    # -- plain endpoints ----------------------------------------------------------------------------

    @app.get("/healthz")
    @endpoint_wrapper("/healthz", needs_auth=False)
    async def healthz(request: Request, t0: float):
        m = engine.model
        return JSONResponse({"status": "ok", "model_loaded": m is not None,
                             "model": m.name if m else None, "version": m.version if m else None,
                             "queue_depth": engine.queue_depth})

    @app.get("/metrics")
    @endpoint_wrapper("/metrics")
    async def metrics_endpoint(request: Request, t0: float):
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card(m: Any) -> dict:
        return {"id": m.name, "object": "model", "created": int(m.loaded_at), "owned_by": "edgellm",
                "version": m.version, "runtime": m.kind, "quantization": m.quantization,
                "context_length": m.context_length}

    @app.get("/v1/models")
    @endpoint_wrapper("/v1/models")
    async def list_models(request: Request, t0: float):
        m = engine.model
        return JSONResponse({"object": "list", "data": [model_card(m)] if m else []})

    @app.get("/v1/models/{model_id}")
    @endpoint_wrapper("/v1/models/{id}")
    async def get_model(request: Request, t0: float):
        m = engine.model
        if m is None or request.path_params["model_id"] != m.name:
            raise ApiError(404, f"model {request.path_params['model_id']!r} is not served here",
                           code="model_not_found")
        return JSONResponse(model_card(m))

    @app.get("/v1/admin/status")
    @endpoint_wrapper("/v1/admin/status")
    async def admin_status(request: Request, t0: float):
        return JSONResponse(hooks.status())

    @app.post("/v1/admin/update")
    @endpoint_wrapper("/v1/admin/update")
    async def admin_update(request: Request, t0: float):
        req = await read_body(request, UpdateRequest)
        hooks.request_update(req.model_dump(exclude_none=True))
        return JSONResponse({"accepted": True}, status_code=202)

    # -- generation ---------------------------------------------------------------------------------

    def build_params(req: Any, max_tokens: int | None) -> GenerationParams:
        if req.n not in (None, 1):
            raise ApiError(400, "only n=1 is supported", code="unsupported_parameter", param="n")
        mt = max_tokens if max_tokens is not None else limits.default_max_tokens
        if mt > limits.max_tokens:
            raise ApiError(400, f"max_tokens {mt} is over this device's limit of {limits.max_tokens}",
                           code="max_tokens_too_large", param="max_tokens")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > 4:
            raise ApiError(400, "at most 4 stop sequences", code="invalid_request", param="stop")
        defaults = dict(getattr(engine.model, "defaults", None) or {})
        return GenerationParams(
            max_tokens=mt,
            temperature=req.temperature if req.temperature is not None else float(defaults.get("temperature", 0.0)),
            top_p=req.top_p if req.top_p is not None else float(defaults.get("top_p", 1.0)),
            top_k=req.top_k if req.top_k is not None else int(defaults.get("top_k", 0)),
            seed=req.seed, stop=stop)

    def check_model(req: Any) -> None:
        m = engine.model
        if m is None:
            raise ApiError(503, "no model is installed on this device yet", code="model_not_loaded",
                           type="server_error", headers={"Retry-After": "30"})
        if req.model not in (None, "", "default", m.name, f"{m.name}:{m.version}", f"{m.name}@{m.version}"):
            raise ApiError(404, f"model {req.model!r} is not served here; this device serves {m.name!r}",
                           code="model_not_found", param="model")

    async def run_generation(request: Request, t0: float, endpoint: str, *, chat: bool):
        req = await read_body(request, ChatCompletionRequest if chat else CompletionRequest)
        if chat:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in req.messages]
            prompt_text = "\n".join(m["content"] for m in messages)
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            prompt = None
        else:
            if isinstance(req.prompt, list):
                if len(req.prompt) != 1:
                    raise ApiError(400, "send exactly one prompt per request", code="invalid_request", param="prompt")
                prompt = req.prompt[0]
            else:
                prompt = req.prompt
            prompt_text, messages, max_tokens = prompt, None, req.max_tokens
        if len(prompt_text) > limits.max_prompt_chars:
            metrics.rejected.labels("prompt_too_long").inc()
            raise ApiError(400, f"prompt has {len(prompt_text)} characters; the limit is {limits.max_prompt_chars}",
                           code="context_length_exceeded", param="messages" if chat else "prompt")
        check_model(req)
        params = build_params(req, max_tokens)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(kind: str, payload: Any) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
                job.cancel.set()

        job = Job(params=params, sink=sink, prompt=prompt, messages=messages, endpoint=endpoint,
                  clamp_max_tokens=max_tokens is None)
        try:
            engine.submit(job)
        except QueueFull as e:
            metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, "the model is busy: too many queued requests; retry after the given delay",
                           code="rate_limit_exceeded", type="rate_limit_error",
                           headers={"Retry-After": str(e.retry_after)}) from None
        if messages is not None:
            hooks.on_chat(messages)
        audit_fields: dict[str, Any] = {"prompt": prompt_text, "user": req.user}
        request.state.audit = audit_fields
        try:
            kind, payload = await _next(request, q, job)
        except BaseException:
            job.cancel.set()
            raise
        if kind == "error":
            raise _job_error(payload)
        start = payload
        audit_fields.update(model=start["model"], model_version=start["version"],
                            prompt_tokens=start["prompt_tokens"])
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            gen = _stream(q, job, chat=chat, rid=rid, created=created, model=start["model"],
                          version=start["version"], include_usage=include_usage,
                          on_end=lambda status, stats: finish(request, endpoint, status, t0, **audit_fields,
                                                              completion_tokens=stats.get("completion_tokens"),
                                                              stream=True))
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts: list[str] = []
        stats: dict = {}
        try:
            while True:
                kind, payload = await _next(request, q, job)
                if kind == "token":
                    parts.append(payload.text)
                elif kind == "done":
                    stats = payload
                    break
                elif kind == "error":
                    raise _job_error(payload)
        except BaseException:
            job.cancel.set()
            raise
        text = "".join(parts)
        usage = {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
                 "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"]}
        fr = stats["finish_reason"] if stats["finish_reason"] in ("stop", "length") else "stop"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": fr}
            body = {"id": rid, "object": "chat.completion", "created": created, "model": start["model"],
                    "system_fingerprint": f"edgellm-{start['version']}", "choices": [choice], "usage": usage}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": fr}
            body = {"id": rid, "object": "text_completion", "created": created, "model": start["model"],
                    "system_fingerprint": f"edgellm-{start['version']}", "choices": [choice], "usage": usage}
        audit_fields["completion_tokens"] = stats["completion_tokens"]
        return JSONResponse(body)

    @app.post("/v1/completions")
    @endpoint_wrapper("/v1/completions")
    async def completions(request: Request, t0: float):
        return await run_generation(request, t0, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    @endpoint_wrapper("/v1/chat/completions")
    async def chat_completions(request: Request, t0: float):
        return await run_generation(request, t0, "/v1/chat/completions", chat=True)

    return app


def _job_error(e: JobError) -> ApiError:
    headers = {"Retry-After": "30"} if e.status == 503 else None
    return ApiError(e.status, e.message, code=e.code, type=e.type, headers=headers)


async def _next(request: Request, q: asyncio.Queue, job: Job) -> tuple[str, Any]:
    """Next event of a non-streamed job; cancels the job if the client goes away meanwhile."""
    while True:
        try:
            return await asyncio.wait_for(q.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                raise ApiError(499, "client closed the request", code="client_closed") from None


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _stream(q: asyncio.Queue, job: Job, *, chat: bool, rid: str, created: int, model: str, version: str,
                  include_usage: bool, on_end: Callable[[int, dict], None]) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    base = {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": f"edgellm-{version}"}

    def chunk(text: str | None, finish_reason: str | None, *, role: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return _sse({**base, "choices": [choice]})

    status, stats = 499, {}
    try:
        if chat:
            yield chunk("", None, role=True)
        while True:
            kind, payload = await q.get()
            if kind == "token":
                if payload.text:
                    yield chunk(payload.text, None)
            elif kind == "done":
                stats = payload
                fr = stats["finish_reason"] if stats["finish_reason"] in ("stop", "length") else "stop"
                yield chunk(None if chat else "", fr)
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": {
                        "prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
                        "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"]}})
                status = 200
                break
            elif kind == "error":
                status = payload.status
                yield _sse({"error": {"message": payload.message, "type": payload.type, "param": None,
                                      "code": payload.code}})
                break
        yield b"data: [DONE]\n\n"
    finally:
        job.cancel.set()  # a client that went away stops its generation
        on_end(status, stats)

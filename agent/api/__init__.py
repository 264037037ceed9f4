"""The local OpenAI-compatible API (FastAPI), one router per area.

    _common     auth (inference token, admin token), bounded body reading, audit + metrics
    health      GET /healthz (no token), GET /metrics
    inference   /v1/models, /v1/completions, /v1/chat/completions (queue, SSE)
    admin       /v1/admin/status, /v1/admin/update (admin token only)
    sse         job events and OpenAI's server-sent event chunks
    server      the uvicorn server: header/body timeouts, connection caps, /healthz kept answering

Every route except ``/healthz`` needs ``Authorization: Bearer <token>`` (constant-time compare);
admin routes need the admin token, which the inference token is not. Bodies are capped in bytes
before parsing and validated with strict, bounded types; errors are OpenAI-shaped JSON
(``{"error": {"message", "type", "param", "code"}}``). Every request writes one audit line.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.api import admin, health, inference
from agent.api._common import AdminHooks, ApiContext, problem_response
from agent.audit import AuditLog
from agent.config import Limits
from agent.engine import Engine
from agent.errors import ApiProblem
from agent.metrics import Metrics

__all__ = ["AdminHooks", "create_app"]

log = logging.getLogger(__name__)


def create_app(
    *,
    engine: Engine,
    token: str,
    limits: Limits,
    admin_token: str | None = None,
    metrics: Metrics | None = None,
    audit: AuditLog | None = None,
    hooks: AdminHooks | None = None,
) -> FastAPI:
    ctx = ApiContext(
        engine=engine,
        token=token,
        admin_token=admin_token,
        limits=limits,
        metrics=metrics or Metrics(),
        audit=audit,
        hooks=hooks or AdminHooks(),
    )
    app = FastAPI(title="edgellm-agent", docs_url=None, redoc_url=None, openapi_url=None)
    for module in (health, inference, admin):
        app.include_router(module.router(ctx))

    @app.exception_handler(ApiProblem)
    async def _problem(request: Request, exc: ApiProblem) -> JSONResponse:
        return problem_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown routes / wrong methods: OpenAI-shaped, audited, one metrics label for all of them
        import time

        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        ctx.finish(request, "(other)", exc.status_code, time.monotonic(), error=code, path=request.url.path[:200])
        return problem_response(
            ApiProblem(exc.status_code, f"{request.method} {request.url.path[:200]}: {exc.detail}", code=code)
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(ApiProblem(400, "invalid request", code="invalid_request"))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s", request.url.path)
        return problem_response(
            ApiProblem(500, "internal error in the agent; see its log", code="internal_error", kind="server_error")
        )

    return app

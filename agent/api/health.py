"""``GET /healthz`` (no token: liveness, also under overload) and ``GET /metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from agent.api._common import ApiContext
from agent.metrics import CONTENT_TYPE_LATEST


def router(ctx: ApiContext) -> APIRouter:
    r = APIRouter()

    @r.get("/healthz")
    @ctx.endpoint("/healthz", auth="none")
    async def healthz(request: Request, t0: float) -> Response:
        m = ctx.engine.model
        return JSONResponse(
            {
                "status": "ok",
                "model_loaded": m is not None,
                "model": m.name if m else None,
                "version": m.version if m else None,
                "queue_depth": ctx.engine.queue_depth,
                "telemetry": ctx.hooks.telemetry().get("state"),
            }
        )

    @r.get("/metrics")
    @ctx.endpoint("/metrics")
    async def metrics(request: Request, t0: float) -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return r

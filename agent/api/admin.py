"""Admin routes: ``GET /v1/admin/status`` and ``POST /v1/admin/update``.

They need the admin token (``DIR/admin-token``), never the inference token: software that may
ask for completions may not force a reinstall or a downgrade."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from agent.api._common import ApiContext
from agent.schemas import UpdateRequest


def router(ctx: ApiContext) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/admin/status")
    @ctx.endpoint("/v1/admin/status", auth="admin")
    async def admin_status(request: Request, t0: float) -> Response:
        return JSONResponse(ctx.hooks.status())

    @r.post("/v1/admin/update")
    @ctx.endpoint("/v1/admin/update", auth="admin")
    async def admin_update(request: Request, t0: float) -> Response:
        req = await ctx.read_body(request, UpdateRequest)
        ctx.hooks.request_update(req)
        return JSONResponse({"accepted": True}, status_code=202)

    return r

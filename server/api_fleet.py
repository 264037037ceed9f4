"""Operator API endpoints of the fleet (registered with :func:`server.api.route`): a device's
group, yanking a version. Device views and rollouts are in :mod:`server.api`."""

from __future__ import annotations

import re
from typing import Any

from server import auth, ops_fleet
from server.api import ApiContext, ApiRequest, _text, route


@route(
    "POST",
    "/devices/{id}/group",
    "operator",
    "Move a device to another group (a signed device assignment).",
    {"group": "string"},
)
def _device_group(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    return ops_fleet.device_group(ctx.data, ctx.store, m["id"], _text(req.json(), "group", required=True), ctx.publish)


@route(
    "POST",
    "/yank",
    "operator",
    "Withdraw a version: no assignment may name it; devices on it move back.",
    {"model": "string", "version": "string", "reason": "string"},
)
def _yank(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    b = req.json()
    return ops_fleet.yank(
        ctx.data,
        ctx.store,
        _text(b, "model", required=True),
        _text(b, "version", required=True),
        _text(b, "reason"),
        ctx.publish,
    )

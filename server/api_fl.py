"""Federated runs in the operator API (``/api/v1/fl/runs``): the run store and its checks are
:mod:`server.federated`'s; this module only exposes them, with the API's roles and audit. The
leader replica's federated driver carries runs out, as ``fl start`` on the server host does."""

from __future__ import annotations

import re
from typing import Any

from server import auth, ops
from server.api import ApiContext, ApiRequest, HttpError, route


def _available() -> None:
    try:
        import server.federated.store  # noqa: F401 - only to learn whether the federated extra is installed
    except ImportError:
        raise HttpError(
            501,
            "federated runs are not part of this server",
            code="not_implemented",
            hint="install the server with its federated package (edgellm[server,federated])",
        ) from None


@route("GET", "/fl/runs", "viewer", "Federated runs, newest first: state, round, devices, losses, ε spent.")
def _runs(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    _available()
    return ops.fl_status(ctx.store)


@route("GET", "/fl/runs/{id}", "viewer", "One federated run.")
def _run(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    _available()
    return ops.fl_status(ctx.store, m["id"])[0]


@route(
    "POST",
    "/fl/runs",
    "operator",
    "Start a federated fine-tuning run (as `fl start`).",
    {"model": "string", "version": "string", "group": "string", "publish": "string", "settings": "object"},
)
def _start(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    _available()
    b = req.json()
    model, version, publish = (b.get(k) for k in ("model", "version", "publish"))
    group = b.get("group", "default")
    if not all(isinstance(v, str) and len(v) <= 256 for v in (model, version, publish, group)):
        raise HttpError(
            400,
            "model, version, publish and group must be strings",
            code="bad_field",
            hint='e.g. {"model": "demo", "version": "1.0", "publish": "1.1", "group": "lab"}',
        )
    settings = b.get("settings") or {}
    if not isinstance(settings, dict):
        raise HttpError(400, "'settings' must be a JSON object", code="bad_field", hint='e.g. {"rounds": 3}')
    return ops.fl_start(
        ctx.data.repo,
        ctx.store,
        model=str(model),
        version=str(version),
        publish=str(publish),
        group=str(group),
        settings=settings,
    )

"""Federated runs in the operator API (``/api/v1/fl/runs``): the run store and its checks are
:mod:`server.federated`'s; this module only exposes them, with the API's roles and audit. The
leader replica's federated driver carries runs out, as ``fl start`` on the server host does."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from server import auth, ops
from server.api import ApiContext, ApiRequest, HttpError, route


def _fl(ctx: ApiContext) -> Any:
    try:
        from server.federated.store import FlStore
    except ImportError:
        raise HttpError(501, "federated runs are not part of this server", code="not_implemented",
                        hint="install the server with its federated package (edgellm[server])") from None
    return FlStore(ctx.store)


@route("GET", "/fl/runs", "viewer", "Federated runs, newest first: state, round, devices, losses, ε spent.")
def _runs(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    fl = _fl(ctx)
    from server.federated.store import status

    return status(fl)


@route("GET", "/fl/runs/{id}", "viewer", "One federated run.")
def _run(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    fl = _fl(ctx)
    from server.federated.store import status

    return status(fl, m["id"])[0]


@route("POST", "/fl/runs", "operator", "Start a federated fine-tuning run (as `fl start`).",
       {"model": "string", "version": "string", "group": "string", "publish": "string", "settings": "object"})
def _start(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    b = req.json()
    fl = _fl(ctx)
    from server.federated.store import RunSettings

    model, version, publish = (b.get(k) for k in ("model", "version", "publish"))
    group = b.get("group", "default")
    if not all(isinstance(v, str) and len(v) <= 256 for v in (model, version, publish, group)):
        raise HttpError(400, "model, version, publish and group must be strings", code="bad_field",
                        hint='e.g. {"model": "demo", "version": "1.0", "publish": "1.1", "group": "lab"}')
    given = b.get("settings") or {}
    known = {f.name for f in dataclasses.fields(RunSettings)}
    if not isinstance(given, dict) or set(given) - known:
        raise HttpError(400, f"unknown settings: {sorted(set(given) - known) if isinstance(given, dict) else given}",
                        code="bad_field", hint=f"settings may hold {', '.join(sorted(known))}")
    try:
        settings = RunSettings(**given).check()
    except TypeError as e:
        raise HttpError(400, f"bad settings: {e}", code="bad_field", hint="see `edgellm-server fl start --help`") from None
    if not any(p["model"] == model and p["version"] == version for p in ops.published(ctx.data.repo)):
        raise HttpError(400, f"the repository has no bundle of {model} {version} for devices to fine-tune",
                        code="not_published", hint="`edgellm-server publish BUNDLE` first")
    rid = fl.create(model=model, base_version=version, version=publish, group=group, settings=settings)
    return {"id": rid, "state": "pending"}

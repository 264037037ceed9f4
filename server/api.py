"""The operator API, ``/api/v1``: everything the ``edgellm-server`` CLI does, for callers with a
bearer token (see :mod:`server.auth` for roles). The OpenAPI document is served at
``/api/v1/openapi.json`` (no token needed); it is made from the route table below, so the two
cannot disagree.

Errors are OpenAI-shaped JSON, ``{"error": {"message", "type", "param", "code", "hint"}}``:
401 without a usable token, 403 for too low a role, 404 for an unknown rollout/device/token,
409 when another replica holds what the call needs (the repository), 400 for a bad request, 413
for an oversized body. Every mutating call (POST, DELETE), allowed or not, goes into the audit
log: who, what, when, the status and the result.

Other parts add their endpoints with :func:`route` (e.g. federated runs).
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm.errors import EdgeLLMError
from server import auth, ops
from server.errors import ConflictError, NotFoundError
from server.store import Store
from server.store.control import ANONYMOUS

if TYPE_CHECKING:
    from server.app import DataDir
    from server.leader import Leadership

__all__ = ["ApiContext", "ApiRequest", "HttpError", "dispatch", "openapi", "route"]

PREFIX = "/api/v1"
#: bounds of a request body: JSON calls, and bundle uploads (streamed to disk)
JSON_BODY_MAX = 64 * 1024
BUNDLE_BODY_MAX = 8 * 1024**3


@dataclasses.dataclass
class ApiContext:
    """What the API acts upon. ``publish(topic, payload, retain)``: the server's broker
    connection (device commands); ``trust_loopback``: a server bound to loopback serves its
    read-only pages (dashboard data, /metrics) without a token."""

    data: DataDir
    store: Store
    publish: ops.Publish | None = None
    leadership: Leadership | None = None
    trust_loopback: bool = True
    #: this process's own figures (what its ingest received and stored)
    replica_stats: Callable[[], dict[str, Any]] | None = None


class HttpError(Exception):
    def __init__(self, status: int, message: str, *, code: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.hint = status, code, hint

    def body(self) -> dict[str, Any]:
        kind = (
            "authentication_error"
            if self.status == 401
            else ("permission_error" if self.status == 403 else "invalid_request_error")
        )
        return {"error": {"message": str(self), "type": kind, "param": None, "code": self.code, "hint": self.hint}}


@dataclasses.dataclass
class ApiRequest:
    """One call, as the HTTP layer hands it over (the body is read on demand, bounded)."""

    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None
    read_body: Callable[[int], bytes]
    save_body: Callable[[Path, int], int]

    def arg(self, name: str, default: str | None = None) -> str | None:
        return self.query.get(name, [default])[0]

    def json(self) -> dict[str, Any]:
        raw = self.read_body(JSON_BODY_MAX)
        try:
            obj = json.loads(raw or b"{}")
        except ValueError:
            raise HttpError(400, "the body is not JSON", code="bad_json", hint="send a JSON object") from None
        if not isinstance(obj, dict):
            raise HttpError(400, "the body must be a JSON object", code="bad_json", hint="send a JSON object")
        return obj


Handler = Callable[[ApiContext, auth.Principal, re.Match[str], ApiRequest], Any]


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    pattern: str  # OpenAPI-style path, e.g. /rollouts/{id}
    role: str
    handler: Handler
    summary: str
    body: dict[str, Any] | None = None

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[A-Za-z0-9._-]{1,128})", self.pattern) + "$")


ROUTES: list[Route] = []


def route(
    method: str, pattern: str, role: str, summary: str, body: dict[str, Any] | None = None
) -> Callable[[Handler], Handler]:
    """Add an endpoint: ``pattern`` under /api/v1, callable by ``role`` and above."""
    auth.check_role(role)

    def deco(fn: Handler) -> Handler:
        ROUTES.append(Route(method, pattern, role, fn, summary, body))
        return fn

    return deco


def _text(d: dict[str, Any], key: str, default: str | None = None, required: bool = False) -> Any:
    v = d.get(key, default)
    if (v is None and required) or (v is not None and not isinstance(v, str | bool)) or len(str(v)) > 256:
        raise HttpError(
            400,
            f"'{key}' must be a string of at most 256 characters",
            code="bad_field",
            hint=f"send {key} as a JSON string",
        )
    return v


# --------------------------------------------------------------------------- read


@route("GET", "/whoami", "viewer", "The caller's token name and role.")
def _whoami(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    return {"name": who.name, "role": who.role, "roles": list(auth.ROLES)}


@route(
    "GET",
    "/devices",
    "viewer",
    "Device registry with desired vs running version, drift, rejected versions and last update error (query: group).",
)
def _devices(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    return ops.devices(ctx.store, req.arg("group"), ctx.data.director(ctx.store))


@route("GET", "/devices/{id}/replies", "viewer", "A device's command replies, oldest first.")
def _replies(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    return ops.device_replies(ctx.store, m["id"])


@route("GET", "/rollouts", "viewer", "Rollouts, newest first, with devices, progress and history.")
def _rollouts(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    return ops.rollout_status(ctx.store)


@route("GET", "/rollouts/{id}", "viewer", "One rollout.")
def _rollout(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    return ops.rollout_status(ctx.store, m["id"])[0]


@route("GET", "/targets", "viewer", "Published bundles (TUF targets).")
def _targets(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    return ops.published(ctx.data.repo)


@route(
    "GET",
    "/replica",
    "viewer",
    "This replica: its id, whether it drives rollouts, the current leader, "
    "and what its own ingest received and stored.",
)
def _replica(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    out: dict[str, Any] = ctx.leadership.status() if ctx.leadership is not None else {"leader": None}
    return {**out, "ingest": ctx.replica_stats() if ctx.replica_stats is not None else {}}


@route("GET", "/ingest", "viewer", "Ingest counters.")
def _ingest(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    return ctx.store.counters()


# --------------------------------------------------------------------------- operator


@route(
    "POST",
    "/rollouts",
    "operator",
    "Start a rollout.",
    {
        "model": "string",
        "version": "string",
        "group": "string",
        "canary": "string",
        "stages": "string",
        "gate": "string",
        "no_gate": "boolean",
        "min_samples": "integer",
        "bake": "string",
        "device_timeout": "string",
        "force": "boolean",
        "adapter": "string",
        "prefer": "string",
    },
)
def _rollout_start(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    b = req.json()
    n = b.get("min_samples")
    if n is not None and (type(n) is not int or not 1 <= n <= 10**9):
        raise HttpError(400, "'min_samples' must be a positive integer", code="bad_field", hint="e.g. 50")
    return ops.rollout_start(
        ctx.data.repo,
        ctx.store,
        model=_text(b, "model", required=True),
        version=_text(b, "version", required=True),
        group=_text(b, "group", "default"),
        canary=_text(b, "canary", "10%"),
        gate=_text(b, "gate", ""),
        bake=_text(b, "bake", "10m"),
        force=b.get("force") is True,
        no_gate=b.get("no_gate") is True,
        stages=_text(b, "stages"),
        min_samples=n,
        device_timeout=_text(b, "device_timeout", "15m"),
        adapter=_text(b, "adapter"),
        prefer=_text(b, "prefer", "adapter"),
    )


@route("POST", "/rollouts/{id}/{action}", "operator", "pause | resume | abort | rollback a rollout.")
def _rollout_action(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    return ops.rollout_action(ctx.store, m["id"], m["action"])


@route(
    "POST",
    "/devices/{id}/commands",
    "operator",
    "Send a command to a device (answered by a reply).",
    {"name": "string", "args": "object"},
)
def _command(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    b = req.json()
    return ops.device_command(ctx.store, ctx.publish, m["id"], _text(b, "name", required=True), b.get("args"))


# --------------------------------------------------------------------------- admin


@route(
    "POST",
    "/publish",
    "admin",
    "Publish a bundle archive (the request body, application/octet-stream).",
    {"binary": "bundle archive"},
)
def _publish(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    uploads = ctx.data.root / "uploads"
    uploads.mkdir(mode=0o700, exist_ok=True)  # inside the data directory: same filesystem, same owner
    name = req.arg("filename") or "bundle.tar"
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", name):
        raise HttpError(400, f"filename {name!r} is not valid", code="bad_field", hint="use letters, digits, . _ -")
    tmp = uploads / secrets.token_hex(8)
    tmp.mkdir(mode=0o700)
    try:
        req.save_body(tmp / name, BUNDLE_BODY_MAX)
        return ops.publish(ctx.data.repo, ctx.data.keys, ctx.store, tmp / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@route("GET", "/tokens", "admin", "API tokens (never the tokens themselves).")
def _tokens(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    return ops.token_list(ctx.store)


@route("POST", "/tokens", "admin", "Make a token; the response holds it, once.", {"name": "string", "role": "string"})
def _token_create(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    b = req.json()
    return ops.token_create(ctx.store, _text(b, "name", required=True), _text(b, "role", required=True))


@route("DELETE", "/tokens/{id}", "admin", "Revoke a token.")
def _token_revoke(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    return ops.token_revoke(ctx.store, m["id"])


@route("POST", "/ca", "admin", "Create the fleet CA.")
def _ca_init(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    return ops.ca_init(ctx.data.ca)


@route(
    "POST",
    "/ca/certificates",
    "admin",
    "Issue a certificate (kind: device, server-client or server); the "
    "response holds the PEM texts, the private key is not kept.",
    {"kind": "string", "name": "string", "hosts": "array"},
)
def _ca_issue(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    b = req.json()
    hosts = b.get("hosts") or []
    if not isinstance(hosts, list) or len(hosts) > 32 or not all(isinstance(x, str) and len(x) <= 253 for x in hosts):
        raise HttpError(
            400,
            "'hosts' must be a list of at most 32 host names",
            code="bad_field",
            hint='e.g. ["broker.example", "10.0.0.5"]',
        )
    return ops.ca_issue_pem(ctx.data.ca, _text(b, "kind", required=True), name=_text(b, "name"), hosts=hosts)


@route(
    "POST",
    "/ca/mosquitto-conf",
    "admin",
    "A Mosquitto configuration requiring fleet client certificates (writes the ACL on the server).",
    {"port": "integer", "bind": "string"},
)
def _ca_mosquitto(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    b = req.json()
    port = b.get("port", 8883)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise HttpError(400, "'port' must be a TCP port number", code="bad_field", hint="e.g. 8883")
    return {"config": ops.mosquitto_conf(ctx.data.ca, ctx.data.root / "mosquitto", port, _text(b, "bind", "0.0.0.0"))}


@route("GET", "/audit", "admin", "The operator audit log, newest first (query: limit).")
def _audit(ctx: ApiContext, who: auth.Principal, m: re.Match[str], req: ApiRequest) -> Any:
    limit = int(req.arg("limit", "100") or 100)
    return [a.to_dict() for a in ctx.store.audit_log(limit=max(1, min(limit, 10_000)))]


# --------------------------------------------------------------------------- dispatch


def openapi() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for r in ROUTES:
        op: dict[str, Any] = {
            "summary": r.summary,
            "x-role": r.role,
            "security": [{"bearer": []}],
            "parameters": [
                {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                for n in re.findall(r"\{(\w+)\}", r.pattern)
            ],
            "responses": {
                "200": {"description": "OK"},
                "401": {"description": "no usable token"},
                "403": {"description": f"needs role {r.role}"},
            },
        }
        if r.body is not None:
            op["requestBody"] = (
                {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
                if "binary" in r.body
                else {
                    "content": {
                        "application/json": {
                            "schema": {"type": "object", "properties": {k: {"type": t} for k, t in r.body.items()}}
                        }
                    }
                }
            )
        paths.setdefault(PREFIX + r.pattern, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgellm-server operator API", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }


def dispatch(ctx: ApiContext, req: ApiRequest) -> tuple[int, Any]:
    """Authenticate, authorize, run, audit. Returns ``(status, JSON body)``."""
    sub = req.path[len(PREFIX) :]
    if req.method == "GET" and sub == "/openapi.json":
        return 200, openapi()
    found = [(r, m) for r in ROUTES if (m := r.regex.match(sub))]
    match = next(((r, m) for r, m in found if r.method == req.method), None)
    who: auth.Principal | None = None
    try:
        if match is None:
            if found:
                raise HttpError(
                    405,
                    f"{req.method} is not allowed on {req.path}",
                    code="method_not_allowed",
                    hint=f"use {', '.join(sorted({r.method for r, _ in found}))}",
                )
            raise HttpError(404, f"no such endpoint: {req.path}", code="not_found", hint=f"see {PREFIX}/openapi.json")
        r, m = match
        who = auth.authenticate(ctx.store, req.authorization)
        auth.require(who, r.role)
        status, body = 200, r.handler(ctx, who, m, req)
    except HttpError as e:
        status, body = e.status, e.body()
    except auth.AuthError as e:
        status, body = (
            e.status,
            HttpError(
                e.status, message(e), code="unauthorized" if e.status == 401 else "forbidden", hint=e.hint
            ).body(),
        )
    except NotFoundError as e:
        status, body = 404, HttpError(404, message(e), code="not_found", hint=e.hint).body()
    except ConflictError as e:
        status, body = 409, HttpError(409, message(e), code="conflict", hint=e.hint).body()
    except EdgeLLMError as e:
        status, body = 400, HttpError(400, message(e), code=type(e).__name__, hint=e.hint).body()
    except ValueError as e:
        status, body = 400, HttpError(400, f"bad request: {e}", code="bad_request", hint="check the call").body()
    if req.method in ("POST", "PUT", "PATCH", "DELETE"):
        _audit_call(ctx, req, who, status, body)
    return status, body


def message(e: BaseException) -> str:
    """An error's message without the hint its ``str()`` appends (the hint has its own field)."""
    if isinstance(e, EdgeLLMError):
        return e.message
    return str(e.args[0]) if e.args else type(e).__name__


def _audit_call(ctx: ApiContext, req: ApiRequest, who: auth.Principal | None, status: int, body: Any) -> None:
    if status < 400:
        result = (
            "ok"
            if not isinstance(body, dict)
            else json.dumps({k: v for k, v in body.items() if k != "token"}, default=str)[:1000]
        )
    else:
        result = str(body.get("error", {}).get("message", "")) if isinstance(body, dict) else str(status)
    ctx.store.audit(
        token=who.token_id if who else None,
        who=who.name if who else ANONYMOUS,
        role=who.role if who else None,
        action=f"{req.method} {req.path}",
        target=req.path,
        status=status,
        result=result,
    )


# Endpoints of other parts register themselves with :func:`route` when imported.
from server import api_fl, api_fleet  # noqa: E402,F401 - they register routes on ROUTES, defined above

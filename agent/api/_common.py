"""What every route of the local API shares: auth, bounded body reading, audit and metrics."""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from agent.audit import AuditLog
from agent.config import Limits
from agent.engine import Engine
from agent.errors import ApiProblem
from agent.metrics import Metrics

log = logging.getLogger(__name__)

Auth = Literal["none", "inference", "admin"]
Handler = Callable[[Request, float], Awaitable[Response]]


@dataclasses.dataclass
class AdminHooks:
    """What the admin and health routes ask the daemon."""

    status: Callable[[], dict] = dict
    request_update: Callable[[Any], None] = lambda req: None
    telemetry: Callable[[], dict] = lambda: {"state": "disabled"}
    on_chat: Callable[[list], object] = lambda messages: None  # --learn-from-use keeps user messages


@dataclasses.dataclass
class ApiContext:
    engine: Engine
    token: str
    admin_token: str | None
    limits: Limits
    metrics: Metrics
    audit: AuditLog | None
    hooks: AdminHooks

    def check_auth(self, request: Request, auth: Auth) -> None:
        if auth == "none":
            return
        got = request.headers.get("authorization", "").encode()
        admin_ok = self.admin_token is not None and hmac.compare_digest(got, f"Bearer {self.admin_token}".encode())
        if auth == "admin":
            if admin_ok:
                return
            self.metrics.rejected.labels("auth").inc()
            if hmac.compare_digest(got, f"Bearer {self.token}".encode()):
                raise ApiProblem(
                    403,
                    "the inference token is not an admin credential",
                    code="admin_token_required",
                    hint="send the token of the agent's admin-token file",
                )
            raise ApiProblem(
                401,
                "missing or wrong admin token: send 'Authorization: Bearer <token>' with the "
                "token from the agent's admin-token file",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(got, f"Bearer {self.token}".encode()):
            self.metrics.rejected.labels("auth").inc()
            raise ApiProblem(
                401,
                "missing or wrong API token: send 'Authorization: Bearer <token>' with the "
                "token from the agent's api-token file",
                code="invalid_api_key",
            )

    def finish(self, request: Request, endpoint: str, status: int, t0: float, **fields: Any) -> None:
        dt = time.monotonic() - t0
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(dt)
        if self.audit is not None:
            try:
                self.audit.write(caller=caller(request), endpoint=endpoint, status=status, duration_s=dt, **fields)
            except Exception:
                log.exception("audit log write failed")

    async def read_body(self, request: Request, model: type[BaseModel]) -> Any:
        limit = self.limits.max_body_bytes
        cl = request.headers.get("content-length")
        if cl is not None and (not cl.isdigit() or len(cl) > 18 or int(cl) > limit):
            raise ApiProblem(413, f"request body over {limit} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiProblem(413, f"request body over {limit} bytes", code="request_too_large")
        try:
            return model.model_validate_json(bytes(body) or b"{}")
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            loc = ".".join(str(x) for x in err.get("loc", ()))
            if err.get("type") == "json_invalid":
                raise ApiProblem(400, "request body is not valid JSON", code="invalid_json") from None
            raise ApiProblem(
                400, f"invalid request: {loc or 'body'}: {err.get('msg')}", code="invalid_request", param=loc or None
            ) from None

    def endpoint(
        self, name: str, auth: Auth = "inference"
    ) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
        """Wrap a handler: auth, OpenAI-shaped errors, metrics and one audit line per request."""

        def deco(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
            async def wrapped(request: Request) -> Response:
                t0 = time.monotonic()
                try:
                    self.check_auth(request, auth)
                    resp = await fn(request, t0)
                except ApiProblem as e:
                    self.finish(request, name, e.status, t0, error=e.code, **getattr(request.state, "audit", {}))
                    return problem_response(e)
                if not isinstance(resp, StreamingResponse):  # a stream audits itself when it ends
                    self.finish(request, name, resp.status_code, t0, **getattr(request.state, "audit", {}))
                return resp

            wrapped.__name__ = fn.__name__
            return wrapped

        return deco


def problem_response(e: ApiProblem) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def caller(request: Request) -> str:
    c = request.client
    if c is None or not c.host:
        return "unix"
    return f"{c.host}:{c.port}"

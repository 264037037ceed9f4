"""The uvicorn server of the local API, hardened against clients that hold connections.

uvicorn alone keeps a connection that never finishes its headers open forever, and its
``limit_concurrency`` counts such connections: a few hundred of them make every request,
``/healthz`` included, answer 503. Here instead:

- a request's headers must arrive within ``header_timeout_s`` of the connection (or of the previous
  response), and its body within ``body_timeout_s``; otherwise the connection is closed;
- headers are capped in size (``max_header_bytes``; more is a 400 or 431);
- each client (peer address on TCP, peer uid on the Unix socket) holds at most
  ``max_connections_per_client`` connections, and all clients ``max_connections``; a new connection
  over a cap closes that client's oldest connection that is not being answered, so a fresh
  ``/healthz`` always gets through;
- at most ``max_connections`` requests run at once (503 with Retry-After beyond), ``/healthz`` exempt.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
import struct
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from agent.audit import AuditLog
from agent.config import Limits
from agent.metrics import Metrics

log = logging.getLogger(__name__)

EXEMPT_PATHS = ("/healthz",)


def _client_key(transport: asyncio.BaseTransport) -> str:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            _pid, uid, _gid = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            )
            return f"uid:{uid}"
        except OSError:
            return "unix"
    peer = transport.get_extra_info("peername")
    return f"ip:{peer[0]}" if isinstance(peer, tuple) and peer else "unknown"


class ConnectionGuard:
    """Bookkeeping of open connections per client, oldest first."""

    def __init__(self, limits: Limits, metrics: Metrics | None = None) -> None:
        self.limits = limits
        self.metrics = metrics
        self.by_client: dict[str, collections.OrderedDict[int, GuardedH11Protocol]] = {}
        self.total = 0
        self.evicted = 0
        self.timed_out = 0

    def admit(self, conn: GuardedH11Protocol) -> None:
        conns = self.by_client.setdefault(conn.client_key, collections.OrderedDict())
        conns[id(conn)] = conn
        self.total += 1
        if len(conns) > self.limits.max_connections_per_client:
            self._evict(list(conns.values()), conn)
        if self.total > self.limits.max_connections:
            self._evict([c for cs in self.by_client.values() for c in cs.values()], conn)

    def _evict(self, candidates: list[GuardedH11Protocol], newcomer: GuardedH11Protocol) -> None:
        victims = sorted(
            (c for c in candidates if c is not newcomer and not c.dropped and c.waiting_for_client()),
            key=lambda c: c.read_started,
        )
        victim = victims[0] if victims else newcomer  # everyone is being served: refuse the newcomer
        self.evicted += 1
        self.count("connection_limit")
        victim.drop("over the connection limit")

    def count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()

    def remove(self, conn: GuardedH11Protocol) -> None:
        conns = self.by_client.get(conn.client_key)
        if conns is not None and conns.pop(id(conn), None) is not None:
            self.total -= 1
            if not conns:
                del self.by_client[conn.client_key]


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read timeouts and connection caps (see the module docstring)."""

    guard: ConnectionGuard  # set on the subclass made by :func:`protocol_class`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn narrows it too
        super().connection_made(transport)
        self.client_key = _client_key(transport)
        self.read_started = self.loop.time()
        self.dropped = False
        self._every = min(1.0, self.guard.limits.header_timeout_s / 4)
        self._tick: asyncio.TimerHandle | None = self.loop.call_later(self._every, self._check)
        self.guard.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.remove(self)
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self.read_started = self.loop.time()  # the next request's headers are awaited from now
        super().on_response_complete()

    def waiting_for_client(self) -> bool:
        """True while the client owes us headers or body (nothing of ours is running for it)."""
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and (
            self.cycle is None or self.cycle.response_complete or self.conn.their_state is h11.SEND_BODY
        )

    def drop(self, why: str) -> None:
        if not self.dropped:
            self.dropped = True
            log.debug("closing connection of %s: %s", self.client_key, why)
            self.transport.abort()  # now, without waiting to flush to a client that may not read

    def _check(self) -> None:
        self._tick = None
        if self.transport.is_closing():
            return
        lim = self.guard.limits
        waited = self.loop.time() - self.read_started
        state = self.conn.their_state
        if state is h11.IDLE and waited > lim.header_timeout_s and self.timeout_keep_alive_task is None:
            self.guard.timed_out += 1
            self.guard.count("slow_client")
            self.drop("request headers not received in time")
            return
        if state is h11.SEND_BODY and waited > lim.body_timeout_s:
            self.guard.timed_out += 1
            self.guard.count("slow_client")
            self.drop("request body not received in time")
            return
        self._tick = self.loop.call_later(self._every, self._check)


def protocol_class(limits: Limits, metrics: Metrics | None = None) -> type[GuardedH11Protocol]:
    return type("AgentH11Protocol", (GuardedH11Protocol,), {"guard": ConnectionGuard(limits, metrics)})


def _json_error(status: int, code: str, message: str) -> tuple[dict, dict]:
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "server_error" if status >= 500 else "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
    ).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"retry-after", b"1"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


class RequestGate:
    """ASGI middleware: headers over ``max_header_bytes`` get a 431 (h11 bounds only headers that
    arrive in pieces); at most ``limit`` requests run at once (503 + Retry-After), some paths exempt."""

    def __init__(
        self,
        app: Any,
        limits: Limits,
        *,
        audit: AuditLog | None = None,
        metrics: Metrics | None = None,
        exempt: tuple[str, ...] = EXEMPT_PATHS,
    ) -> None:
        self.app, self.limits, self.exempt = app, limits, exempt
        self.audit, self.metrics = audit, metrics
        self.running = 0

    async def _refuse(self, scope: dict, send: Any, status: int, code: str, message: str) -> None:
        for msg in _json_error(status, code, message):
            await send(msg)
        if self.metrics is not None:
            self.metrics.rejected.labels(code).inc()
        if self.audit is not None:
            client = scope.get("client")
            try:
                self.audit.write(
                    caller=f"{client[0]}:{client[1]}" if client else "unix",
                    endpoint="(gate)",
                    status=status,
                    duration_s=0.0,
                    error=code,
                    path=str(scope.get("path", ""))[:200],
                )
            except Exception:
                log.exception("audit log write failed")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if (
            sum(len(k) + len(v) + 4 for k, v in scope["headers"]) + len(scope.get("raw_path") or b"")
            > self.limits.max_header_bytes
        ):
            await self._refuse(
                scope, send, 431, "headers_too_large", f"request headers over {self.limits.max_header_bytes} bytes"
            )
            return
        if scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.running >= self.limits.max_connections:
            await self._refuse(scope, send, 503, "overloaded", "the agent is handling too many requests; retry shortly")
            return
        self.running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1


def uvicorn_config(
    app: Any, limits: Limits, *, audit: AuditLog | None = None, metrics: Metrics | None = None, **kw: Any
) -> Any:
    """uvicorn settings of the agent: guarded h11 protocol, bounded headers, no connection-count 503.
    Refusals are counted in ``metrics`` (rejected requests by reason) and written to ``audit``."""
    import uvicorn

    return uvicorn.Config(
        RequestGate(app, limits, audit=audit, metrics=metrics),
        http=protocol_class(limits, metrics),
        log_config=None,
        access_log=False,
        lifespan="off",
        ws="none",
        server_header=False,
        timeout_keep_alive=min(5, max(1, int(limits.header_timeout_s))),
        h11_max_incomplete_event_size=limits.max_header_bytes,
        **kw,
    )

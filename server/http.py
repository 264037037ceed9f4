"""The server's HTTP side (stdlib, one thread per request):

    /api/v1/...            the operator API (bearer tokens, roles, audit): :mod:`server.api`
    /                      fleet dashboard (self-contained HTML, inline JS + SVG, no CDN)
    /metadata/<file>       TUF metadata  } the repository, served as static files;
    /targets/<file>        bundles       } devices verify everything with python-tuf
    /api/devices           device registry (JSON)
    /api/rollouts[/<id>]   rollouts with devices, progress and history
    /api/series?by=version|device&since=SECONDS_AGO&bucket=SECONDS   metrics for charts
    /api/ingest            ingest counters (stored, duplicates, quarantined, malformed_<reason>)
    /api/quarantine        the newest refused messages: reason, topic, size, first bytes (base64)
    /metrics               Prometheus text format
    /healthz               liveness

The read-only pages under /api/ and /metrics are open when the server is bound to loopback;
bound beyond it they need a viewer token too (``Authorization: Bearer``), as /api/v1 always does.
The dashboard page itself, /healthz and the repository stay open (devices verify what they fetch).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from server import api as v1
from server import auth, rollout
from server.errors import RolloutError
from server.store import Store

logger = logging.getLogger(__name__)

_FILE_RE = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
_ASSIGNMENT_DIRS = ("assignments/device", "assignments/group")


def dashboard_html() -> bytes:
    return resources.files("server").joinpath("static/dashboard.html").read_bytes()


def prometheus_text(store: Store, director: Any = None) -> str:
    from server.fleet import prometheus_text as text

    return text(store, director)


def _series(store: Store, qs: dict[str, list[str]]) -> list[Any]:
    by = qs.get("by", ["version"])[0]
    since = time.time() - _finite(qs.get("since", ["3600"])[0])
    bucket = max(1.0, _finite(qs.get("bucket", ["60"])[0]))
    return store.series(by=by, since=since, bucket_s=bucket, device=qs.get("device", [None])[0])


def _finite(text: str) -> float:
    v = float(text)  # ValueError -> 400
    if not math.isfinite(v):
        raise ValueError(f"{text!r} is not a finite number")
    return v


def _esc(s: Any) -> str:
    return str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        logger.debug("http: " + fmt, *args)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.store.release()  # one thread per connection: hand its database connection back

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, code: int = 200) -> None:
        self._send(code, json.dumps(obj, default=str).encode(), "application/json")

    def _error(self, code: int, msg: str, hint: str | None = None) -> None:
        self._json(
            v1.HttpError(
                code,
                msg,
                code={401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(
                    code, "bad_request" if code < 500 else "internal_error"
                ),
                hint=hint,
            ).body(),
            code,
        )

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        self._v1()

    def do_DELETE(self) -> None:
        self._v1()

    def _v1(self) -> None:
        u = urlparse(self.path)
        ctx = self.server.api
        if ctx is None or not u.path.startswith(v1.PREFIX + "/"):
            self._drain()
            self._error(
                404 if ctx is None or self.command == "GET" else 405,
                f"no such endpoint: {u.path}",
                hint=f"the operator API is under {v1.PREFIX}",
            )
            return
        req = v1.ApiRequest(
            self.command, u.path, parse_qs(u.query), self.headers.get("Authorization"), self._read_body, self._save_body
        )
        try:
            status, body = v1.dispatch(ctx, req)
        except _TooLarge as e:
            self.close_connection = True
            status, body = 413, v1.HttpError(413, str(e), code="too_large", hint="send a smaller body").body()
        except Exception:
            logger.exception("http: %s %s failed", self.command, self.path)
            self.close_connection = True
            status, body = (
                500,
                v1.HttpError(500, "internal error", code="internal_error", hint="see the server log").body(),
            )
        self._drain()
        self._json(body, status)

    def _length(self, limit: int) -> int:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _TooLarge("Content-Length is not a number") from None
        if n < 0 or n > limit:
            raise _TooLarge(f"body of {n} bytes; the limit is {limit}")
        return n

    def _read_body(self, limit: int) -> bytes:
        n = self._length(limit)
        self._body_read = True
        return self.rfile.read(n)

    def _save_body(self, path: Path, limit: int) -> int:
        n = self._length(limit)
        self._body_read = True
        left = n
        with open(path, "wb") as fh:
            while left:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    raise ValueError("the body ended early")
                fh.write(chunk)
                left -= len(chunk)
        return n

    def _drain(self) -> None:
        """An unread body would be taken for the next request on this connection: close it."""
        if self.headers.get("Content-Length") not in (None, "0") and not getattr(self, "_body_read", False):
            self.close_connection = True

    def do_GET(self) -> None:
        if self.path.startswith(v1.PREFIX + "/"):
            self._v1()
            return
        try:
            self._route()
        except auth.AuthError as e:
            self._error(e.status, v1.message(e), e.hint)
        except RolloutError as e:
            self._error(404, str(e))
        except ValueError as e:
            self._error(400, f"bad request: {e}")
        except Exception:
            logger.exception("http: %s failed", self.path)
            self._error(500, "internal error")

    def _route(self) -> None:
        u = urlparse(self.path)
        path, qs = u.path, parse_qs(u.query)
        store = self.server.store
        if (path.startswith("/api/") or path == "/metrics") and not self.server.open_reads:
            who = auth.authenticate(store, self.headers.get("Authorization"))
            auth.require(who, "viewer")
        if path in ("/", "/dashboard"):
            self._send(200, dashboard_html(), "text/html; charset=utf-8")
        elif path == "/healthz":
            self._json({"ok": True})
        elif path == "/metrics":
            self._send(200, prometheus_text(store, self.server.director).encode(), "text/plain; version=0.0.4")
        elif path == "/api/devices":
            from server.fleet import device_views

            self._json(device_views(store, self.server.director, group=qs.get("group", [None])[0]))
        elif path == "/api/rollouts":
            self._json(rollout.status(store))
        elif path.startswith("/api/rollouts/"):
            self._json(rollout.status(store, path.rsplit("/", 1)[1])[0])
        elif path == "/api/series":
            self._json([p.to_dict() for p in _series(store, qs)])
        elif path == "/api/ingest":
            self._json(store.counters())
        elif path == "/api/quarantine":
            self._json(
                [
                    {**q.to_dict(), "payload": base64.b64encode(q.payload).decode()}
                    for q in store.quarantined(limit=max(1, min(1000, int(qs.get("limit", ["100"])[0]))))
                ]
            )
        elif path.startswith("/metadata/") or path.startswith("/targets/"):
            self._static(path)
        else:
            self._error(404, f"no such page: {path}", hint=f"the operator API is under {v1.PREFIX}")

    def _static(self, path: str) -> None:
        repo = self.server.repo_dir
        sub, _, name = path.lstrip("/").partition("/")
        folder, _, base = name.rpartition("/")
        if folder and not (sub == "targets" and folder in _ASSIGNMENT_DIRS):
            base = "/"  # only the director's assignment folders are nested
        if repo is None or not _FILE_RE.match(base) or base.startswith("."):
            self._error(404, "not found")
            return
        f = repo / sub / name
        if not f.is_file():
            self._error(404, "not found")
            return
        size = f.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/json" if sub == "metadata" else "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                self.wfile.write(chunk)


class _TooLarge(Exception):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        addr: tuple[str, int],
        store: Store,
        repo_dir: Path | None,
        api: v1.ApiContext | None,
        director: Any = None,
    ) -> None:
        super().__init__(addr, _Handler)
        self.store = store
        self.repo_dir = repo_dir
        self.api = api
        self.director = director
        self.open_reads = api is None or (api.trust_loopback and is_loopback(addr[0]))


class HttpServer:
    def __init__(
        self,
        store: Store,
        repo_dir: Path | None,
        host: str = "127.0.0.1",
        port: int = 8080,
        api: v1.ApiContext | None = None,
        director: Any = None,
    ) -> None:
        self._srv = _Server((host, port), store, repo_dir, api, director)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._srv.server_address[:2]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._srv.serve_forever, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()
        if self._thread:
            self._thread.join(timeout=5)

"""A small client for the device agent's local API (standard library only).

For firmware and apps on the device itself::

    from edgellm.client import AgentClient

    c = AgentClient(token_file="/var/lib/edgellm-agent/api-token")          # http://127.0.0.1:8321
    c = AgentClient(socket_path="/run/edgellm/agent.sock", token="...")     # or over a Unix socket
    print(c.complete("The robot", max_tokens=16)["choices"][0]["text"])
    for piece in c.stream_chat([{"role": "user", "content": "status?"}]):
        print(piece, end="", flush=True)

The API is OpenAI-compatible, so the official ``openai`` package also works unchanged with
``base_url="http://127.0.0.1:8321/v1"`` and the token as ``api_key``. With curl::

    curl -s http://127.0.0.1:8321/v1/chat/completions \\
      -H "Authorization: Bearer $(cat /var/lib/edgellm-agent/api-token)" \\
      -H "Content-Type: application/json" \\
      -d '{"model": "tiny", "messages": [{"role": "user", "content": "status?"}], "max_tokens": 32}'

Errors come back as :class:`AgentAPIError` (an :class:`~edgellm.errors.EdgeLLMError` with a
``hint``) with the HTTP status, the OpenAI-style error code and, for 429/503, the server's
``Retry-After`` in seconds; an agent that is not running raises :class:`AgentUnreachable`
naming the address it tried.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from edgellm.errors import EdgeLLMError

__all__ = ["AgentAPIError", "AgentClient", "AgentUnreachable"]

DEFAULT_URL = "http://127.0.0.1:8321"
DEFAULT_AGENT_DIR = "/var/lib/edgellm-agent"


class AgentAPIError(EdgeLLMError):
    """The agent answered with an error: ``status``, OpenAI-style ``code``, ``retry_after`` (429/503)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        retry_after: float | None = None,
        *,
        hint: str | None = None,
    ) -> None:
        super().__init__(f"{status} {code or ''}: {message}".strip(), hint=hint or _hint_for(status, retry_after))
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after


class AgentUnreachable(AgentAPIError):
    """Nothing answers at the agent's address (not running, wrong address, socket missing)."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(
            0,
            f"cannot reach the agent at {address}: {reason}",
            "agent_unreachable",
            hint=f"is `edgellm-agent run` running and listening on {address}? "
            "Check `edgellm-agent status`, or pass base_url= / socket_path=",
        )
        self.address = address


def _hint_for(status: int, retry_after: float | None) -> str | None:
    if status == 401:
        return "send the token from the agent's api-token file (admin routes need the admin-token file)"
    if status == 403:
        return "admin routes need the admin token (DIR/admin-token), not the inference token"
    if status in (429, 503):
        return f"the agent is busy or has no model yet: retry after {retry_after or 1:g} s"
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def agent_address(agent_dir: str | Path) -> tuple[str | None, str | None]:
    """(base_url, socket_path) of the agent whose data dir is ``agent_dir``: the running daemon's
    real address (``run/agent.json``), else the ``listen`` / ``socket`` of its ``config.json``."""
    d = Path(agent_dir)
    run = _read_json(d / "run" / "agent.json")
    if isinstance(run.get("port"), int) and run["port"] > 0:
        return f"http://127.0.0.1:{run['port']}", None
    if run.get("socket"):
        return None, str(run["socket"])
    cfg = _read_json(d / "config.json")
    if cfg.get("listen"):
        host, _, port = str(cfg["listen"]).rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}", None
    if cfg.get("socket"):
        return None, str(cfg["socket"])
    return None, None


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class AgentClient:
    """Talks to ``edgellm-agent run`` over loopback HTTP or its Unix socket.

    Without ``base_url`` / ``socket_path`` the address comes from the agent's data dir
    (``$EDGELLM_AGENT_DIR``, else /var/lib/edgellm-agent): the running daemon's, else its config's,
    else ``http://127.0.0.1:8321``. The token is that dir's ``api-token``; admin calls
    (``status``, ``request_update``) use ``admin_token`` or the dir's ``admin-token`` file."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        socket_path: str | Path | None = None,
        timeout: float = 120.0,
        agent_dir: str | Path | None = None,
        admin_token: str | None = None,
    ) -> None:
        self.agent_dir = Path(agent_dir or os.environ.get("EDGELLM_AGENT_DIR") or DEFAULT_AGENT_DIR)
        if token is None:
            tf = Path(token_file or os.environ.get("EDGELLM_AGENT_TOKEN_FILE") or self.agent_dir / "api-token")
            try:
                token = tf.read_text().strip()
            except OSError as e:
                raise EdgeLLMError(
                    f"cannot read the agent's API token from {tf}: {e.strerror or e}",
                    hint="pass token= or token_file=, or set EDGELLM_AGENT_DIR to the agent's "
                    "data dir (the token file is readable by its owner only)",
                ) from e
        self.token = token
        self._admin_token = admin_token
        if base_url is None and socket_path is None:
            base_url, found_socket = agent_address(self.agent_dir)
            socket_path = found_socket
        self.socket_path = str(socket_path) if socket_path else None
        u = urlparse(base_url or DEFAULT_URL)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}" if self.socket_path else f"http://{self.host}:{self.port}{self.prefix}"

    def _admin(self) -> str:
        if self._admin_token is None:
            f = self.agent_dir / "admin-token"
            try:
                self._admin_token = f.read_text().strip()
            except OSError as e:
                raise EdgeLLMError(
                    f"cannot read the agent's admin token from {f}: {e.strerror or e}",
                    hint="admin calls need admin_token= (the agent's admin-token file, mode 0600)",
                ) from e
        return self._admin_token

    # -- transport ------------------------------------------------------------------------------

    def _conn(self) -> http.client.HTTPConnection:
        if self.socket_path:
            return _UnixHTTPConnection(self.socket_path, self.timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _request(
        self, method: str, path: str, body: dict | None = None, *, token: str | None = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._conn()
        headers = {"Authorization": f"Bearer {token or self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, self.prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
        except (TimeoutError, ConnectionError, FileNotFoundError, http.client.RemoteDisconnected) as e:
            conn.close()
            raise AgentUnreachable(self.address, f"{type(e).__name__}: {e}") from e
        except OSError as e:  # e.g. EACCES on the socket, host unreachable
            conn.close()
            raise AgentUnreachable(self.address, f"{type(e).__name__}: {e}") from e
        if resp.status >= 400:
            raw = resp.read()
            conn.close()
            try:
                err = json.loads(raw)["error"]
                msg, code = err.get("message", ""), err.get("code")
            except (ValueError, KeyError, TypeError):
                msg, code = raw.decode(errors="replace")[:500], None
            ra = resp.getheader("Retry-After")
            raise AgentAPIError(resp.status, msg, code, float(ra) if ra and ra.isdigit() else None)
        return conn, resp

    def _json(self, method: str, path: str, body: dict | None = None, *, token: str | None = None) -> Any:
        conn, resp = self._request(method, path, body, token=token)
        try:
            return json.loads(resp.read())
        finally:
            conn.close()

    def _sse(self, path: str, body: dict) -> Iterator[dict]:
        conn, resp = self._request("POST", path, body)
        try:
            while True:
                line = resp.readline()
                if not line:
                    return
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                obj = json.loads(payload)
                if "error" in obj:
                    e = obj["error"]
                    raise AgentAPIError(500, e.get("message", ""), e.get("code"))
                yield obj
        finally:
            conn.close()  # closing mid-stream makes the agent stop generating

    # -- API --------------------------------------------------------------------------------------

    def health(self) -> dict:
        return self._json("GET", "/healthz")

    def models(self) -> list[dict]:
        return self._json("GET", "/v1/models")["data"]

    def status(self) -> dict:
        return self._json("GET", "/v1/admin/status", token=self._admin())

    def request_update(
        self, version: str | None = None, *, model: str | None = None, rollback: bool = False, force: bool = False
    ) -> dict:
        body = {
            k: v for k, v in (("version", version), ("model", model), ("rollback", rollback), ("force", force)) if v
        }
        return self._json("POST", "/v1/admin/update", body, token=self._admin())

    def complete(self, prompt: str, *, model: str = "default", max_tokens: int = 64, **params: Any) -> dict:
        return self._json(
            "POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens, **params}
        )

    def chat(self, messages: list[dict], *, model: str = "default", max_tokens: int = 64, **params: Any) -> dict:
        return self._json(
            "POST", "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": max_tokens, **params}
        )

    def stream_complete(
        self, prompt: str, *, model: str = "default", max_tokens: int = 64, **params: Any
    ) -> Iterator[str]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, **params}
        for chunk in self._sse("/v1/completions", body):
            for ch in chunk.get("choices", []):
                if ch.get("text"):
                    yield ch["text"]

    def stream_chat(
        self, messages: list[dict], *, model: str = "default", max_tokens: int = 64, **params: Any
    ) -> Iterator[str]:
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, **params}
        for chunk in self._sse("/v1/chat/completions", body):
            for ch in chunk.get("choices", []):
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    yield piece

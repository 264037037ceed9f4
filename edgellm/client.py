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

Errors come back as :class:`AgentAPIError` with the HTTP status, the OpenAI-style error code and,
for 429, the server's ``Retry-After`` in seconds.
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

__all__ = ["AgentAPIError", "AgentClient"]

DEFAULT_URL = "http://127.0.0.1:8321"


class AgentAPIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code or ''}: {message}".strip())
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after


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
    """Talks to ``edgellm-agent run`` over loopback HTTP or its Unix socket."""

    def __init__(self, base_url: str | None = None, *, token: str | None = None, token_file: str | Path | None = None,
                 socket_path: str | Path | None = None, timeout: float = 120.0) -> None:
        if token is None:
            tf = token_file or os.environ.get("EDGELLM_AGENT_TOKEN_FILE") or \
                Path(os.environ.get("EDGELLM_AGENT_DIR", "/var/lib/edgellm-agent")) / "api-token"
            token = Path(tf).read_text().strip()
        self.token = token
        self.socket_path = str(socket_path) if socket_path else None
        u = urlparse(base_url or DEFAULT_URL)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout

    # -- transport ------------------------------------------------------------------------------

    def _conn(self) -> http.client.HTTPConnection:
        if self.socket_path:
            return _UnixHTTPConnection(self.socket_path, self.timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._conn()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, self.prefix + path, body=data, headers=headers)
        resp = conn.getresponse()
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

    def _json(self, method: str, path: str, body: dict | None = None) -> Any:
        conn, resp = self._request(method, path, body)
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
        return self._json("GET", "/v1/admin/status")

    def request_update(self, version: str | None = None) -> dict:
        return self._json("POST", "/v1/admin/update", {"version": version} if version else {})

    def complete(self, prompt: str, *, model: str = "default", max_tokens: int = 64, **params: Any) -> dict:
        return self._json("POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens, **params})

    def chat(self, messages: list[dict], *, model: str = "default", max_tokens: int = 64, **params: Any) -> dict:
        return self._json("POST", "/v1/chat/completions",
                          {"model": model, "messages": messages, "max_tokens": max_tokens, **params})

    def stream_complete(self, prompt: str, *, model: str = "default", max_tokens: int = 64, **params: Any) -> Iterator[str]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, **params}
        for chunk in self._sse("/v1/completions", body):
            for ch in chunk.get("choices", []):
                if ch.get("text"):
                    yield ch["text"]

    def stream_chat(self, messages: list[dict], *, model: str = "default", max_tokens: int = 64, **params: Any) -> Iterator[str]:
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, **params}
        for chunk in self._sse("/v1/chat/completions", body):
            for ch in chunk.get("choices", []):
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    yield piece

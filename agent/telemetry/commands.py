"""Commands from the control plane: a registry (name -> handler) and the thread that runs them.

A new command is one registration::

    telemetry.commands.register("fl_invite", lambda args: supervisor.join(args))

A handler takes the command's ``args`` (a dict) and returns a JSON-able result; raising an error
answers ``ok: false`` with its message (and hint). Handlers run on the dispatcher thread, never
on the MQTT thread, so a slow one delays other commands but never the connection.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from edgellm import telemetry as wire
from edgellm.errors import EdgeLLMError

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Any]


class CommandRegistry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._lock = threading.Lock()

    def register(self, name: str, handler: Handler) -> None:
        """Answer command ``name`` with ``handler(args)`` (replaces an earlier registration)."""
        with self._lock:
            self._handlers[name] = handler

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._handlers)

    def run(self, cmd: wire.Command) -> dict[str, Any]:
        """The reply body of ``cmd``: ``{id, name, ok, result}`` or ``{id, name, ok: false, error[, hint]}``."""
        body: dict[str, Any] = {"id": cmd.id, "name": cmd.name}
        with self._lock:
            handler = self._handlers.get(cmd.name)
        if handler is None:
            body.update(
                ok=False, error=f"unknown command {cmd.name!r}", hint=f"this agent knows: {', '.join(self.names())}"
            )
            return body
        try:
            body.update(ok=True, result=handler(dict(cmd.args)))
        except EdgeLLMError as e:
            body.update(ok=False, error=e.message, hint=e.hint)
        except Exception as e:  # noqa: BLE001 - a failing handler answers, it does not kill the thread
            logger.warning("telemetry: command %s failed: %s", cmd.name, e)
            body.update(ok=False, error=f"{type(e).__name__}: {e}")
        return body


class Dispatcher:
    """One thread running queued callables in order (desired-state callbacks, commands)."""

    def __init__(self, name: str) -> None:
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, fn: Callable[[], None]) -> None:
        self._q.put(fn)

    def stop(self, timeout: float = 5.0) -> None:
        self._q.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            fn = self._q.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:
                logger.exception("telemetry: callback failed")

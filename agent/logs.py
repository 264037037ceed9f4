"""Structured logging for the daemon and the CLI: one JSON object per line on stderr."""

from __future__ import annotations

import collections
import json
import logging
import sys
import time

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class RingHandler(logging.Handler):
    """Keeps the newest formatted lines in memory (the control plane's ``logs`` command)."""

    def __init__(self, capacity: int = 200, max_line: int = 400) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self.max_line = max_line

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record)[: self.max_line])
        except Exception:  # noqa: BLE001 - logging never raises into the caller
            self.handleError(record)


_RING = RingHandler()


def recent(n: int) -> list[str]:
    """The newest ``n`` log lines of this process (bounded in number and length)."""
    return list(_RING.lines)[-n:]


def logs_command(args: dict) -> dict:
    """The control plane's ``logs`` command: ``{"lines": N}`` (1..200, default 50)."""
    from agent.errors import ConfigError

    n = args.get("lines", 50)
    if type(n) is not int or not 1 <= n <= 200:
        raise ConfigError("logs: lines must be an integer from 1 to 200", hint='send {"lines": 50}')
    return {"lines": recent(n)}


def configure(level: int = logging.INFO, *, json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    _RING.setFormatter(handler.formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler, _RING]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the audit log records every request

"""The audit log: one JSON line per API request, size-bounded with rotation."""

from __future__ import annotations

import json
import logging
import logging.handlers
import threading
import time
from pathlib import Path
from typing import Any


class AuditLog:
    def __init__(
        self, path: str | Path, *, include_prompts: bool = False, max_bytes: int = 16 << 20, backups: int = 3
    ) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.include_prompts = include_prompts
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._lock = threading.Lock()

    def write(
        self,
        *,
        caller: str,
        endpoint: str,
        status: int,
        duration_s: float,
        model_version: str | None = None,
        model: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        prompt: str | None = None,
        **extra: Any,
    ) -> None:
        rec: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
            "caller": caller,
            "endpoint": endpoint,
            "model": model,
            "model_version": model_version,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "status": status,
            "duration_ms": round(duration_s * 1000.0, 2),
            **extra,
        }
        if self.include_prompts and prompt is not None:
            rec["prompt"] = prompt
        line = json.dumps(rec, ensure_ascii=False, default=str)
        record = logging.LogRecord("edgellm.audit", logging.INFO, "", 0, line, None, None)
        with self._lock:
            self._handler.emit(record)

    def close(self) -> None:
        self._handler.close()

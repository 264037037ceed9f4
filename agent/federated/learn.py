"""`--learn-from-use`: keep the user's own chat messages as local training text, capped, wipeable.

Off by default. When on, each chat request's ``user`` messages are appended to
``DIR/learn/messages.jsonl`` (one ``{"text": ...}`` per line, the format ``--train-data`` reads)
until the file reaches ``learn_max_bytes``; later messages are not kept. System prompts and model
replies are never kept. The file is private to the agent (0600), is only ever read by the
ClientApp on this device, and ``edgellm-agent learn wipe`` erases it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from agent.config import AgentConfig, AgentPaths
from agent.federated.device import learned_path

log = logging.getLogger(__name__)

_LOCK = threading.Lock()


class Recorder:
    """Appends user messages to the capped learn file; safe to call from any thread."""

    def __init__(self, paths: AgentPaths, max_bytes: int) -> None:
        self.path = learned_path(paths)
        self.max_bytes = max(0, int(max_bytes))

    def __call__(self, messages: Sequence[dict[str, Any]]) -> int:
        """Keep the ``user`` messages that still fit; returns how many were kept."""
        lines = [
            json.dumps({"text": m["content"]}, ensure_ascii=False).encode("utf-8") + b"\n"
            for m in messages
            if m.get("role") == "user" and isinstance(m.get("content"), str) and m["content"].strip()
        ]
        if not lines:
            return 0
        kept = 0
        with _LOCK:
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    size = os.fstat(fd).st_size
                    for line in lines:
                        if size + len(line) > self.max_bytes:
                            break
                        os.write(fd, line)
                        size += len(line)
                        kept += 1
                finally:
                    os.close(fd)
            except OSError as e:  # a full disk must not fail the user's request
                log.warning("learn from use: message not kept (%s)", e)
        return kept


def recorder(paths: AgentPaths, config: AgentConfig) -> Callable[[Sequence[dict[str, Any]]], int]:
    """The chat hook of the local API: a :class:`Recorder` when learning from use is on, else a no-op."""
    if not config.learn_from_use:
        return lambda messages: 0
    return Recorder(paths, config.learn_max_bytes)


def status(paths: AgentPaths, config: AgentConfig) -> dict[str, Any]:
    p = learned_path(paths)
    size = p.stat().st_size if p.is_file() else 0
    lines = p.read_bytes().count(b"\n") if size else 0
    return {
        "enabled": config.learn_from_use,
        "path": str(p),
        "bytes": size,
        "messages": lines,
        "max_bytes": config.learn_max_bytes,
    }


def wipe(paths: AgentPaths) -> int:
    """Erase the kept messages; returns how many bytes were removed."""
    p = learned_path(paths)
    with _LOCK:
        if not p.exists():
            return 0
        size = p.stat().st_size
        p.unlink()
    log.info("learned-from-use text wiped (%d bytes)", size)
    return size

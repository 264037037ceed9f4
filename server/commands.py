"""Operator commands to one device over the MQTT command channel (``ping``, ``status``,
``update``, ``logs``, ``retry``).

A CLI process queues the command in the shared store; the server process that drives rollouts
sends it (:func:`send_pending`, each tick); the agent's reply comes back through telemetry
ingest as a ``reply`` message, which :func:`run` waits for. So the CLI needs no broker
credentials, only the data directory (or the operator API).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from edgellm import telemetry as wire
from edgellm.ids import ID_RULE, valid_id
from server.errors import ServerError
from server.store import Store

#: what an operator may send a device from the server (the agent knows more, e.g. fl_invite)
COMMANDS = ("ping", "status", "update", "logs", "retry")


def queue(store: Store, device: str, name: str, args: dict[str, Any] | None = None) -> str:
    if not valid_id(device):
        raise ServerError(f"device {device!r} is not a valid id", hint=f"use {ID_RULE}")
    if store.device(device) is None:
        raise ServerError(f"no device {device!r}", hint="list devices with `edgellm-server devices`")
    cid = f"c-{secrets.token_hex(6)}"
    store.queue_command(cid, device, name, dict(args or {}))
    return cid


def run(
    store: Store,
    device: str,
    name: str,
    args: dict[str, Any] | None = None,
    *,
    timeout_s: float = 30.0,
    poll_s: float = 0.2,
) -> dict[str, Any]:
    """Queue ``name`` for ``device`` and wait for its reply (``{id, name, ok, result|error}``)."""
    if name not in COMMANDS:
        raise ServerError(f"unknown device command {name!r}", hint=f"use one of {', '.join(COMMANDS)}")
    cid = queue(store, device, name, args)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = store.command_reply(device, cid)
        if reply is not None:
            return reply
        time.sleep(poll_s)
    row = store.device(device)
    online = row is not None and row.online
    raise ServerError(
        f"{device} did not answer {name} within {timeout_s:g}s ({'online' if online else 'offline'})",
        hint="is `edgellm-server run` running (it sends commands), and the device online?",
    )


def send_pending(store: Store, publish: Callable[[str, bytes, bool], None]) -> int:
    """Send queued commands (the server's loop calls this). Returns how many were sent."""
    n = 0
    for c in store.pending_commands():
        publish(
            wire.command_topic(c["device"]),
            wire.dumps(wire.Command(id=c["id"], name=c["name"], args=c["args"]).to_dict()),
            False,
        )
        store.command_sent(c["id"])
        n += 1
    return n

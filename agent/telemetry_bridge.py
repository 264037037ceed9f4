"""Connects the daemon to ``agent.telemetry``, or to a stand-in that says why there is none.

Telemetry never switches off silently: a device without MQTT settings reports ``disabled``; a
misconfigured one (an id telemetry refuses, a bad broker URL, paho missing) logs an error and
reports ``error`` with the reason in ``status`` and ``/healthz`` while the API keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from agent.config import AgentConfig, AgentPaths
from agent.errors import message_of
from agent.telemetry.commands import CommandRegistry
from edgellm.errors import EdgeLLMError

log = logging.getLogger(__name__)


class TelemetryPort(Protocol):
    """What the daemon needs from telemetry (the real :class:`agent.telemetry.Telemetry` or a stand-in)."""

    commands: CommandRegistry

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def set_state(
        self,
        *,
        version: str | None = None,
        model: str | None = None,
        slot: str | None = None,
        health: str | None = None,
    ) -> None: ...

    def record_inference(
        self,
        *,
        latency_ms: float,
        prompt_tokens: int,
        completion_tokens: int,
        tokens_per_second: float,
        mean_logprob: float | None = None,
        error: bool = False,
    ) -> None: ...

    def event(self, kind: str, **fields: Any) -> None: ...

    def set_group(self, group: str) -> None: ...

    def on_desired(self, callback: Callable[[dict[str, Any]], None]) -> None: ...


class NoTelemetry:
    """Stands in when there is no telemetry: ``state`` is ``disabled`` (not configured) or ``error``."""

    def __init__(self, state: str = "disabled", error: str | None = None) -> None:
        self.commands = CommandRegistry()
        self._status = {"state": state, "error": error}

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> dict[str, Any]:
        return dict(self._status)

    def set_state(self, **state: Any) -> None:
        """Nothing is reported."""

    def record_inference(self, **stats: Any) -> None:
        """Nothing is aggregated."""

    def event(self, kind: str, **fields: Any) -> None:
        """Nothing is sent."""

    def set_group(self, group: str) -> None:
        """Nothing is reported."""

    def on_desired(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """No desired state ever arrives."""


def telemetry_problem(config: AgentConfig) -> str | None:
    """Why telemetry with ``config`` cannot start (an id it refuses, a bad broker URL), or None."""
    from edgellm.ids import ID_RULE, valid_id

    for value, what in ((config.device_id, "device id"), (config.group, "group")):
        if not valid_id(value):
            return f"{what} {value!r} is not valid for telemetry (use {ID_RULE}; re-provision the device)"
    if config.mqtt is not None:
        try:
            _ = config.mqtt.port
        except EdgeLLMError as e:
            return _reason(e)
    return None


def _reason(e: EdgeLLMError) -> str:
    return f"{message_of(e)} ({e.hint})" if e.hint else message_of(e)


def make_telemetry(config: AgentConfig, paths: AgentPaths) -> TelemetryPort:
    if config.mqtt is None:
        return NoTelemetry("disabled")
    reason = telemetry_problem(config)
    if reason is None:
        try:
            from agent.telemetry import Telemetry

            return Telemetry(config.device_id, paths.root, config.mqtt, config.profile, config.group)
        except EdgeLLMError as e:
            reason = _reason(e)
        except ImportError as e:
            reason = f"MQTT support is not installed ({e}): pip install 'edgellm[agent]'"
        except Exception as e:  # noqa: BLE001 - a telemetry misconfiguration must not stop serving
            reason = f"{type(e).__name__}: {e}"
    log.error("MQTT telemetry is OFF: %s", reason)
    return NoTelemetry("error", reason)

"""Connects the daemon to ``agent.telemetry`` (owned by the control plane), or to a no-op."""

from __future__ import annotations

import logging
from typing import Any

from agent.config import AgentConfig, AgentPaths

log = logging.getLogger(__name__)


class NoopTelemetry:
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def set_state(self, **fields: Any) -> None: ...

    def record_inference(self, **fields: Any) -> None: ...

    def event(self, kind: str, **fields: Any) -> None: ...

    def on_desired(self, callback: Any) -> None: ...

    def on_command(self, callback: Any) -> None: ...


def make_telemetry(config: AgentConfig, paths: AgentPaths) -> Any:
    if config.mqtt is None:
        return NoopTelemetry()
    try:
        from agent.telemetry import Telemetry
        from edgellm.telemetry import MqttConfig
    except ImportError as e:
        log.warning("MQTT telemetry unavailable (%s): running without it", e)
        return NoopTelemetry()
    d = config.mqtt.to_dict()
    try:
        mqtt = MqttConfig.from_dict(d) if hasattr(MqttConfig, "from_dict") else MqttConfig(**d)
        return Telemetry(config.device_id, paths.root, mqtt, config.profile, config.group)
    except Exception as e:  # noqa: BLE001 - a telemetry misconfiguration must not stop serving
        log.error("MQTT telemetry not started: %s", e)
        return NoopTelemetry()

"""The agent's config.json: one MQTT settings type that keeps unknown fields, one duration parser."""

from __future__ import annotations

import pytest


def test_mqtt_settings_are_the_sdk_type_and_keep_fields_they_do_not_know():
    from agent.config import AgentConfig
    from edgellm.telemetry import MqttConfig

    cfg = AgentConfig.from_dict(
        {
            "device_id": "robot-1",
            "profile": "rpi4-4gb",
            "future": {"x": 1},
            "mqtt": {"url": "mqtts://broker:8883", "ca": "/etc/ca.pem", "qos_hint": 2},
        }
    )
    assert isinstance(cfg.mqtt, MqttConfig) and cfg.mqtt.port == 8883 and cfg.mqtt.tls
    d = cfg.to_dict()
    assert d["mqtt"]["qos_hint"] == 2 and d["future"] == {"x": 1}
    assert AgentConfig.from_dict(d).to_dict() == d


def test_durations_in_config_use_the_one_parser_and_bad_ones_are_refused_with_a_hint():
    from agent.config import AgentConfig
    from agent.errors import ConfigError

    cfg = AgentConfig.from_dict(
        {
            "device_id": "robot-1",
            "profile": "rpi4-4gb",
            "update_interval_s": "2h",
            "trial_commit_s": 45,
            "limits": {"header_timeout_s": "500ms"},
        }
    )
    assert (cfg.update_interval_s, cfg.trial_commit_s, cfg.limits.header_timeout_s) == (7200.0, 45.0, 0.5)
    for bad in ({"update_interval_s": "soon"}, {"limits": {"body_timeout_s": -1}}, {"mqtt": {"url": 5}}):
        with pytest.raises(ConfigError) as e:
            AgentConfig.from_dict({"device_id": "robot-1", "profile": "rpi4-4gb", **bad})
        assert e.value.hint and "config.json" in e.value.message


def test_errors_carry_hints_as_fields_and_the_client_error_is_an_edgellm_error():
    from agent.errors import AgentError, ApiProblem, ConfigError, QueueFull, message_of
    from edgellm.client import AgentAPIError, AgentUnreachable
    from edgellm.errors import EdgeLLMError

    e = ConfigError("bad id", hint="use robot-1")
    assert (e.message, e.hint, message_of(e)) == ("bad id", "use robot-1", "bad id")
    assert issubclass(AgentUnreachable, AgentAPIError) and issubclass(AgentAPIError, EdgeLLMError)
    assert all(issubclass(c, AgentError) for c in (ApiProblem, QueueFull, ConfigError))
    assert AgentAPIError(429, "busy", "rate_limit_exceeded", 3.0).hint

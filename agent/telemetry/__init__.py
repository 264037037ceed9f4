"""Device telemetry over MQTT with a durable SQLite outbox (no torch here).

from agent.telemetry import Telemetry
t = Telemetry("dev-1", data_dir, MqttConfig("mqtt://broker:1883"), profile="rpi5")
t.on_desired(lambda d: updater.install(d["model"], d["version"]))
t.commands.register("reboot", lambda args: ...)     # command name -> handler
t.start(); t.set_state(version="1.0", model="tiny", slot="a", health="ok")
t.record_inference(latency_ms=120, prompt_tokens=12, completion_tokens=32, tokens_per_second=40)
t.stop()
"""

from agent.telemetry.client import Telemetry
from agent.telemetry.commands import CommandRegistry
from agent.telemetry.outbox import Outbox, OutboxRow
from edgellm.telemetry import MqttConfig

__all__ = ["CommandRegistry", "MqttConfig", "Outbox", "OutboxRow", "Telemetry"]

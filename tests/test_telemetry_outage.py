"""A 30-second broker outage while agents keep publishing: after the broker comes back, the
server has stored every message exactly once (count and per-device sequence numbers checked)."""

from __future__ import annotations

import time

import pytest

from agent.telemetry import Telemetry
from edgellm.telemetry import MqttConfig
from server.ingest import Ingest
from server.store import Store

OUTAGE_S = 30.0
AGENTS = 3


@pytest.mark.slow
def test_broker_outage_loses_nothing_and_stores_each_message_once(tmp_path, mqtt_broker):
    store = Store(tmp_path / "store.sqlite")
    ing = Ingest(store, MqttConfig(mqtt_broker.url), client_id="outage-server")
    ing.start()
    assert ing.wait_connected(10)
    agents = [
        Telemetry(
            f"out-{i}",
            tmp_path / f"a{i}",
            MqttConfig(mqtt_broker.url),
            "sim",
            heartbeat_s=3600,
            metrics_interval_s=3600,
            backoff_min_s=0.2,
            backoff_max_s=2.0,
        )
        for i in range(AGENTS)
    ]
    for a in agents:
        a.start()
    sent = {a.device_id: 0 for a in agents}

    def publish_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for a in agents:
                a.event("tick", n=sent[a.device_id])
                sent[a.device_id] += 1
            time.sleep(0.05)

    try:
        publish_for(2.0)
        mqtt_broker.stop()  # SIGTERM: the broker saves the server's persistent session
        publish_for(OUTAGE_S)
        assert all(len(a.outbox) > 0 for a in agents), "messages must wait in the outbox during the outage"
        mqtt_broker.start()
        publish_for(2.0)
        for a in agents:
            assert a.wait_delivered(60), f"{a.device_id}: {len(a.outbox)} messages still in the outbox"
        expected = sum(sent.values()) + AGENTS  # + the first heartbeat of each agent
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and store.message_count() < expected:
            time.sleep(0.1)
        assert store.message_count() == expected
        for a in agents:
            seqs = store.message_seqs(a.device_id)
            assert seqs == list(range(1, sent[a.device_id] + 2)), f"{a.device_id}: gaps or extra seqs"
            ticks = sorted(e["fields"]["n"] for e in store.events(device=a.device_id, name="tick"))
            assert ticks == list(range(sent[a.device_id]))
            assert a.outbox.dropped == 0
    finally:
        for a in agents:
            a.stop()
        ing.stop()

"""The durable outbox: sequence numbers, acknowledgement, bounds, and surviving kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from agent.telemetry.outbox import Outbox
from edgellm.telemetry import MqttConfig
from server.ingest import Ingest
from server.store import Store


def test_seq_is_monotonic_and_persists_across_reopen(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    seqs = [ob.put("t", lambda s: f"m{s}".encode()) for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    ob.ack([1, 2])
    ob.close()
    ob = Outbox(tmp_path / "o.sqlite")
    assert [r.seq for r in ob.pending()] == [3, 4, 5]
    assert ob.pending()[0].payload == b"m3"
    assert ob.put("t", lambda s: b"x") == 6  # never reused, even after acks
    ob.ack(list(range(1, 7)))
    assert len(ob) == 0 and ob.pending() == []
    assert ob.put("t", lambda s: b"x") == 7


def test_pending_pages_after_a_cursor(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    for _ in range(10):
        ob.put("t", lambda s: b"x")
    assert [r.seq for r in ob.pending(after_seq=3, limit=4)] == [4, 5, 6, 7]


def test_bounded_drops_oldest_and_counts(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", max_messages=3)
    for _ in range(5):
        ob.put("t", lambda s: b"x")
    assert len(ob) == 3
    assert [r.seq for r in ob.pending()] == [3, 4, 5]
    assert ob.dropped == 2
    ob.close()
    assert Outbox(tmp_path / "o.sqlite", max_messages=3).dropped == 2


def test_failed_payload_build_allocates_nothing(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")

    def boom(seq):
        raise ValueError("no")

    try:
        ob.put("t", boom)
    except ValueError:
        pass
    assert ob.put("t", lambda s: b"x") == 1 and len(ob) == 1


AGENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from agent.telemetry import Telemetry
    from edgellm.telemetry import MqttConfig
    url, data, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    t = Telemetry("killed-1", data, MqttConfig(url), "sim", heartbeat_s=3600, metrics_interval_s=3600,
                  backoff_min_s=0.1, backoff_max_s=0.5)
    t.start()
    if mode == "produce":
        for i in range(40):
            t.event("work", i=i)
        print("queued", len(t.outbox), flush=True)
        time.sleep(3600)
    else:
        ok = t.wait_delivered(20)
        print("delivered", ok, len(t.outbox), flush=True)
        t.stop()
""")


def test_kill_9_with_unsent_messages_then_restart_delivers_them(tmp_path, mqtt_broker):
    from fixtures_mqtt import free_port

    script = tmp_path / "device_main.py"
    script.write_text(AGENT)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    dead_url = f"mqtt://127.0.0.1:{free_port()}"  # nobody listens: everything stays in the outbox
    p = subprocess.Popen(
        [sys.executable, str(script), dead_url, str(tmp_path / "dev"), "produce"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = p.stdout.readline()
    assert line.startswith("queued"), line
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    p.stdout.close()

    store = Store(tmp_path / "store.sqlite")
    ing = Ingest(store, MqttConfig(mqtt_broker.url), client_id="kill9-server")
    ing.start()
    try:
        assert ing.wait_connected(10)
        out = subprocess.run(
            [sys.executable, str(script), mqtt_broker.url, str(tmp_path / "dev"), "deliver"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert out.stdout.startswith("delivered True 0"), out.stdout + out.stderr
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and store.message_count("killed-1", "event") < 40:
            time.sleep(0.05)
        events = store.events(device="killed-1", name="work")
        assert sorted(e["fields"]["i"] for e in events) == list(range(40))
        seqs = store.message_seqs("killed-1")
        assert len(seqs) == len(set(seqs))
    finally:
        ing.stop()
        store.close()


def test_a_wiped_outbox_starts_a_new_epoch_the_server_does_not_drop(tmp_path):
    from edgellm import telemetry as wire

    store = Store(tmp_path / "store.sqlite")
    for run in range(2):  # the device's outbox is wiped between the runs (re-provisioned)
        ob = Outbox(tmp_path / f"o{run}.sqlite")
        ob.put("t", lambda s: b"x")
        env = wire.Envelope(device="d", kind="event", seq=1, ts=1.0, epoch=ob.epoch, body={"name": f"run{run}"})
        assert store.ingest([env]) == {"stored": 1, "duplicates": 0}
        assert store.ingest([env]) == {"stored": 0, "duplicates": 1}
    assert [e["name"] for e in store.events(device="d")] == ["run0", "run1"]
    reopened = Outbox(tmp_path / "o1.sqlite")
    assert reopened.epoch == ob.epoch

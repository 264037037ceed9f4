"""Telemetry end to end against a real Mosquitto: wire schemas, online state from birth/death,
desired state, commands, malformed payloads, and mutual TLS with the fleet CA."""

from __future__ import annotations

import functools
import json
import time

import pytest
from fixtures_mqtt import raw_client
from waiting import wait_for as _wait_for

from agent.telemetry import Telemetry
from agent.telemetry.aggregate import InferenceAggregator, percentile
from edgellm import telemetry as wire
from edgellm.telemetry import MqttConfig
from server.ingest import Ingest
from server.store import Store

wait_for = functools.partial(_wait_for, timeout=15.0)


@pytest.fixture
def ingest(tmp_path, mqtt_broker):
    store = Store(tmp_path / "store.sqlite")
    ing = Ingest(store, MqttConfig(mqtt_broker.url), client_id=f"srv-{tmp_path.name}"[:60])
    ing.start()
    assert ing.wait_connected(10)
    yield ing
    ing.stop()


# --------------------------------------------------------------------------- wire format


def test_envelope_roundtrip_keeps_unknown_fields():
    d = {
        "device": "d1",
        "kind": "metrics",
        "seq": 3,
        "ts": 1.5,
        "v": 1,
        "epoch": "e1",
        "future": {"x": 1},
        "body": {"interval_s": 60, "count": 2, "p95_latency_ms": 10.0, "new_metric": 7},
    }
    env = wire.Envelope.from_json(json.dumps(d).encode())
    assert env.to_dict() == d
    m = env.typed_body()
    assert isinstance(m, wire.Metrics) and m.extra == {"new_metric": 7}
    assert m.to_dict()["new_metric"] == 7
    assert wire.Desired.from_json(wire.Desired(model="m", version="2").to_json()).version == "2"


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1,2]",
        b'{"device": "d1"}',
        b'{"device": "../x", "kind": "event", "seq": 1, "ts": 0, "body": {}}',
        b'{"device": "d1", "kind": "nope", "seq": 1, "ts": 0, "body": {}}',
        b'{"device": "d1", "kind": "metrics", "seq": 1, "ts": 0, "body": {"count": "many", "interval_s": 1}}',
        b'{"device": "d1", "kind": "event", "seq": -1, "ts": 0, "body": {"name": "x"}}',
        b'{"device": "d1", "kind": "event", "seq": 1, "ts": 0, "v": 99, "body": {"name": "x"}}',
        b"x" * (wire.MAX_PAYLOAD_BYTES + 1),
    ],
)
def test_malformed_envelopes_are_refused(payload):
    with pytest.raises(wire.TelemetryError):
        wire.Envelope.from_json(payload)


def test_topics_and_config():
    assert wire.parse_device_topic(wire.device_topic("d-1", "event")) == ("d-1", "event")
    assert wire.parse_device_topic("edgellm/v1/desired/group/x") is None
    assert wire.shared_device_subscription() == "$share/edgellm/edgellm/v1/dev/+/+"
    c = MqttConfig("mqtts://broker.example:8884", ca="ca.crt")
    assert (c.host, c.port, c.tls) == ("broker.example", 8884, True)
    assert MqttConfig("mqtt://h").port == 1883
    with pytest.raises(wire.TelemetryError):
        _ = MqttConfig("http://h:1").port


def test_aggregator_percentiles():
    agg = InferenceAggregator()
    for i in range(1, 101):
        agg.add(
            latency_ms=i,
            prompt_tokens=i,
            completion_tokens=2,
            tokens_per_second=10.0,
            mean_logprob=-1.0,
            error=i % 10 == 0,
        )
    s = agg.drain()
    assert (s["count"], s["errors"], s["p50_latency_ms"], s["p95_latency_ms"]) == (100, 10, 50.0, 95.0)
    assert s["prompt_tokens_max"] == 100 and s["mean_logprob"] == -1.0 and s["completion_tokens"] == 200
    assert agg.drain() is None
    assert percentile([5.0], 95) == 5.0


# --------------------------------------------------------------------------- live broker


def test_birth_heartbeat_metrics_and_clean_death(tmp_path, mqtt_broker, ingest):
    store = ingest.store
    t = Telemetry(
        "dev-a",
        tmp_path / "a",
        MqttConfig(mqtt_broker.url),
        "rpi5-8gb",
        group="lab",
        heartbeat_s=0.5,
        metrics_interval_s=0.3,
    )
    t.set_state(version="1.0", model="tiny", slot="a", health="ok")
    t.start()
    for i in range(30):
        t.record_inference(
            latency_ms=100 + i,
            prompt_tokens=10,
            completion_tokens=20,
            tokens_per_second=50,
            mean_logprob=-1.0,
            error=i == 0,
        )
    d = wait_for(lambda: (x := store.device("dev-a")) and x["online"] and x, what="device online")
    assert (d["profile"], d["group"], d["version"], d["model"], d["health"]) == ("rpi5-8gb", "lab", "1.0", "tiny", "ok")
    summ = wait_for(lambda: (s := store.metric_summary(["dev-a"], "1.0", 0))["count"] == 30 and s, what="metrics")
    assert summ["errors"] == 1 and summ["mean_logprob"] == -1.0
    t.set_state(version="1.1")
    wait_for(lambda: store.device("dev-a")["version"] == "1.1", what="version change reported")
    t.stop()
    wait_for(lambda: not store.device("dev-a")["online"], what="offline after clean stop")


def test_a_late_will_from_an_old_connection_does_not_mark_a_reconnected_device_offline(tmp_path, mqtt_broker, ingest):
    store = ingest.store
    t = Telemetry("dev-w", tmp_path / "w", MqttConfig(mqtt_broker.url), "sim", keepalive_s=1)
    t.start()
    wait_for(lambda: (x := store.device("dev-w")) and x["online"], what="online")
    first_session = store.device("dev-w")["session"]
    t.link.client.socket().close()  # a network loss: no DISCONNECT, the broker publishes the will
    wait_for(lambda: t.connects >= 2 and store.device("dev-w")["session"] != first_session, what="reconnect")
    time.sleep(0.5)
    assert store.device("dev-w")["online"], "the old session's will must not mark the new session offline"
    t.stop()


def test_a_killed_device_goes_offline_through_its_last_will(tmp_path, mqtt_broker, ingest):
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "device_main.py"
    script.write_text(
        "import sys, time\nfrom pathlib import Path\nfrom agent.telemetry import Telemetry\n"
        "from edgellm.telemetry import MqttConfig\n"
        "t = Telemetry('dev-k', Path(sys.argv[2]), MqttConfig(sys.argv[1]), 'sim', keepalive_s=2)\n"
        "t.start()\nprint('up', flush=True)\ntime.sleep(3600)\n"
    )
    p = subprocess.Popen(
        [sys.executable, str(script), mqtt_broker.url, str(tmp_path / "k")],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    try:
        assert p.stdout.readline().strip() == "up"
        wait_for(lambda: (x := ingest.store.device("dev-k")) and x["online"], what="online")
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        p.stdout.close()
    wait_for(lambda: not ingest.store.device("dev-k")["online"], timeout=15, what="offline by the will")


def test_desired_state_device_overrides_group_and_commands_get_replies(tmp_path, mqtt_broker, ingest):
    got = []
    t = Telemetry("dev-d", tmp_path / "d", MqttConfig(mqtt_broker.url), "sim", group="g1")
    t.on_desired(got.append)
    t.commands.register("echo", lambda args: {"echo": args})
    t.start()
    wait_for(lambda: t.connected, what="connected")
    ingest.publish(wire.desired_group_topic("g1"), wire.Desired(model="m", version="2").to_json())
    wait_for(lambda: got, what="group desired")
    ingest.publish(wire.desired_device_topic("dev-d"), wire.Desired(model="m", version="1", rollout="r1").to_json())
    wait_for(lambda: len(got) == 2, what="device desired")
    ingest.publish(wire.desired_device_topic("dev-d"), b"")  # pin cleared: back to the group's
    wait_for(lambda: len(got) == 3, what="pin cleared")
    assert [(g["version"], g["source"]) for g in got] == [("2", "group"), ("1", "device"), ("2", "group")]
    assert got[1]["rollout"] == "r1"
    for cid, name in (("c1", "ping"), ("c2", "echo"), ("c3", "state"), ("c4", "reboot")):
        ingest.publish(
            wire.command_topic("dev-d"), json.dumps({"id": cid, "name": name, "args": {"a": 1}}).encode(), retain=False
        )
    replies = wait_for(lambda: len(r := ingest.store.message_bodies("dev-d", "reply")) == 4 and r, what="replies")
    by_id = {b["id"]: b for b in replies}
    assert by_id["c1"]["result"] == "pong" and by_id["c2"]["result"] == {"echo": {"a": 1}}
    assert by_id["c4"]["ok"] is False and "unknown command 'reboot'" in by_id["c4"]["error"]
    t.stop()


def test_malformed_payloads_are_counted_and_dropped_and_ingest_keeps_going(tmp_path, mqtt_broker, ingest):
    store = ingest.store
    c = raw_client(mqtt_broker.url, "vandal")
    bad = [
        ("edgellm/v1/dev/x1/event", b"\x00\xffnot json"),
        ("edgellm/v1/dev/x1/event", b'{"device": "x1", "kind": "event"}'),
        (
            "edgellm/v1/dev/x1/metrics",
            json.dumps(
                {"device": "x1", "kind": "metrics", "seq": 5, "ts": 1, "body": {"interval_s": "soon", "count": 1}}
            ).encode(),
        ),
        (
            "edgellm/v1/dev/x1/event",
            json.dumps(
                {"device": "someone-else", "kind": "event", "seq": 1, "ts": 1, "body": {"name": "spoof"}}
            ).encode(),
        ),
        ("edgellm/v1/dev/x1/event", b"{" + b" " * (wire.MAX_PAYLOAD_BYTES + 10) + b"}"),
    ]
    for topic, payload in bad:
        c.publish(topic, payload, qos=1).wait_for_publish(5)
    t = Telemetry("x1", tmp_path / "x1", MqttConfig(mqtt_broker.url), "sim")
    t.start()
    t.event("still-alive", n=1)
    wait_for(lambda: store.events(device="x1", name="still-alive"), what="good message after bad ones")
    counters = wait_for(
        lambda: (k := store.counters()) and sum(v for n, v in k.items() if n.startswith("malformed")) == 5 and k,
        what="malformed counted",
    )
    assert counters["malformed_json"] == 1 and counters["malformed_oversized"] == 1
    assert counters["malformed_schema"] == 2 and counters["malformed_topic"] == 1
    assert store.device("someone-else") is None
    t.stop()
    c.loop_stop()
    c.disconnect()


def test_duplicates_are_stored_once(tmp_path, mqtt_broker, ingest):
    c = raw_client(mqtt_broker.url, "replayer")
    env = wire.Envelope(device="dup", kind="event", seq=7, ts=time.time(), body={"name": "once", "fields": {}})
    for _ in range(5):
        c.publish(wire.device_topic("dup", "event"), env.to_json(), qos=1).wait_for_publish(5)
    wait_for(lambda: ingest.counters["duplicates"] == 4, what="duplicates counted")
    assert ingest.store.message_seqs("dup") == [7]
    c.loop_stop()
    c.disconnect()


# --------------------------------------------------------------------------- mutual TLS


def test_mtls_broker_accepts_fleet_certs_and_refuses_others(tmp_path, fleet_pki):
    """The production Mosquitto config (server.identity): client certs from the fleet CA required,
    the certificate's CN is the user name, and the ACL pins each device to its own topics."""
    import paho.mqtt.client as mqtt
    from fixtures_mqtt import Broker, free_port

    from server.identity import mosquitto_acl, mosquitto_config

    port = free_port()
    b = Broker(tmp_path / "broker")
    b.port = port
    acl = tmp_path / "broker" / "mosquitto.acl"
    acl.write_text(mosquitto_acl())
    b.config.write_text(
        mosquitto_config(
            port=port,
            bind="127.0.0.1",
            ca=fleet_pki["ca"],
            cert=fleet_pki["server"].cert,
            key=fleet_pki["server"].key,
            acl_file=acl,
            run_as_root=True,
        )
    )
    b.start()
    url = f"mqtts://127.0.0.1:{port}"
    ca = str(fleet_pki["ca"])
    store = Store(tmp_path / "store.sqlite")
    ing = Ingest(store, MqttConfig(url, ca=ca, cert=str(fleet_pki["ingest"].cert), key=str(fleet_pki["ingest"].key)))
    agents = []
    try:
        ing.start()
        assert ing.wait_connected(10)
        good = Telemetry(
            "dev-good",
            tmp_path / "good",
            MqttConfig(url, ca=ca, cert=str(fleet_pki["good"].cert), key=str(fleet_pki["good"].key)),
            "sim",
        )
        rogue = Telemetry(
            "dev-rogue",
            tmp_path / "rogue",
            MqttConfig(url, ca=ca, cert=str(fleet_pki["bad"].cert), key=str(fleet_pki["bad"].key)),
            "sim",
            backoff_min_s=0.1,
            backoff_max_s=0.3,
        )
        anon = Telemetry(
            "dev-anon", tmp_path / "anon", MqttConfig(url, ca=ca), "sim", backoff_min_s=0.1, backoff_max_s=0.3
        )
        agents = [good, rogue, anon]
        for t in agents:
            t.start()
            t.event("hello")
        assert good.wait_delivered(10)
        wait_for(lambda: store.events(device="dev-good", name="hello"), what="good device's event stored over TLS")
        time.sleep(1.0)  # several attempts each
        assert rogue.link.attempts >= 2 and anon.link.attempts >= 2
        assert good.connects == 1 and rogue.connects == 0 and anon.connects == 0
        assert len(rogue.outbox) >= 1 and len(anon.outbox) >= 1  # kept for when they get a valid cert
        assert store.device("dev-rogue") is None and store.device("dev-anon") is None

        # A fleet device cannot speak for another device (ACL: its CN must be in the topic).
        spoof = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="spoofer", protocol=mqtt.MQTTv5)
        MqttConfig(url, ca=ca, cert=str(fleet_pki["good"].cert), key=str(fleet_pki["good"].key)).apply_tls(spoof)
        codes = []
        spoof.on_publish = lambda c, u, mid, rc, p: codes.append(rc.value)
        spoof.connect("127.0.0.1", port)
        spoof.loop_start()
        env = wire.Envelope(device="dev-other", kind="event", seq=1, ts=time.time(), body={"name": "spoof"})
        spoof.publish(wire.device_topic("dev-other", "event"), env.to_json(), qos=1).wait_for_publish(5)
        spoof.disconnect()
        spoof.loop_stop()
        assert codes == [0x87]  # MQTT 5 "Not authorized"
        time.sleep(0.3)
        assert store.device("dev-other") is None
    finally:
        for t in agents:
            t.stop()
        ing.stop()
        b.stop()


def test_ca_issues_verifiable_device_certs(tmp_path, fleet_pki):
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(fleet_pki["good"].cert.read_bytes())
    ca = x509.load_pem_x509_certificate(fleet_pki["ca"].read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == "CN=dev-good"
    assert oct(fleet_pki["good"].key.stat().st_mode & 0o777) == "0o600"


def test_registry_flags_silent_online_devices_as_stale(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    birth = wire.Envelope(device="quiet", kind="birth", seq=0, ts=time.time(), body={"session": "s1"})
    store.ingest([birth], received=time.time() - 3600)
    d = store.device("quiet")
    assert d["online"] and d["stale"]
    assert not store.devices(stale_after_s=7200)[0]["stale"]


def test_ingest_retries_a_failed_store_write_without_losing_the_batch(tmp_path, mqtt_broker, ingest, monkeypatch):
    real = ingest.store.ingest
    calls = {"n": 0}

    def flaky(envs, received=None):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OSError("disk hiccup")
        return real(envs, received)

    monkeypatch.setattr(ingest.store, "ingest", flaky)
    t = Telemetry("flaky-db", tmp_path / "f", MqttConfig(mqtt_broker.url), "sim")
    t.start()
    t.event("keep-me")
    wait_for(lambda: ingest.store.events(device="flaky-db", name="keep-me"), what="stored after retries")
    assert ingest.counters["store_errors"] == 2
    t.stop()


def test_metrics_intervals_are_split_at_a_version_change(tmp_path, mqtt_broker, ingest):
    t = Telemetry("dev-v", tmp_path / "v", MqttConfig(mqtt_broker.url), "sim", metrics_interval_s=3600)
    t.set_state(version="1.0", model="m")
    t.start()
    wait_for(lambda: t.connected, what="connected")
    for _ in range(5):
        t.record_inference(latency_ms=100, prompt_tokens=4, completion_tokens=4, tokens_per_second=10)
    t.set_state(version="2.0")
    for _ in range(3):
        t.record_inference(latency_ms=900, prompt_tokens=4, completion_tokens=4, tokens_per_second=10)
    t.stop()  # closes the last interval
    s1 = wait_for(lambda: (s := ingest.store.metric_summary(["dev-v"], "1.0", 0))["count"] == 5 and s, what="1.0")
    s2 = wait_for(lambda: (s := ingest.store.metric_summary(["dev-v"], "2.0", 0))["count"] == 3 and s, what="2.0")
    assert s1["p95_latency_ms"] == 100 and s2["p95_latency_ms"] == 900


def test_two_server_replicas_split_ingest_through_the_shared_subscription(tmp_path, mqtt_broker, ingest):
    other = Ingest(ingest.store, MqttConfig(mqtt_broker.url), client_id="replica-2")
    other.start()
    try:
        assert other.wait_connected(10)
        agents = [
            Telemetry(f"split-{i}", tmp_path / f"s{i}", MqttConfig(mqtt_broker.url), "sim", heartbeat_s=3600)
            for i in range(4)
        ]
        for a in agents:
            a.start()
            for k in range(25):
                a.event("n", k=k)
        for a in agents:
            assert a.wait_delivered(20)
        wait_for(lambda: ingest.store.message_count(kind="event") == 100, what="100 events stored")
        assert ingest.counters["stored"] > 0 and other.counters["stored"] > 0  # both replicas took a share
        assert ingest.counters["duplicates"] + other.counters["duplicates"] == 0
        for a in agents:
            a.stop()
    finally:
        other.stop()

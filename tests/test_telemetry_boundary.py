"""Nothing a device sends can stop the server ingesting the others: every field is typed and
bounded at the boundary, a message the store still refuses is found by splitting its batch, and
whatever is refused is set aside (quarantine), counted and acknowledged. A device's clock never
decides what the server keeps."""

from __future__ import annotations

import functools
import json
import sqlite3
import time

import pytest
from fixtures_mqtt import raw_client
from waiting import wait_for as _wait_for

from edgellm import telemetry as wire
from edgellm.telemetry import MqttConfig
from server.http import prometheus_text
from server.ingest import Ingest
from server.store import QUARANTINE_PAYLOAD_BYTES, Store

wait_for = functools.partial(_wait_for, timeout=15.0)
TEN_YEARS = 10 * 365 * 86400


def envelope(device: str, kind: str, seq: int, body: dict, ts: float | None = None, epoch: str = "e1") -> dict:
    return {
        "device": device,
        "kind": kind,
        "seq": seq,
        "ts": time.time() if ts is None else ts,
        "epoch": epoch,
        "v": 1,
        "body": body,
    }


# The four messages that each stopped ingest for the whole fleet, plus a clock set to infinity.
POISON = {
    "seq 2^64": envelope("bad-1", "event", 2**64, {"name": "x"}),
    "outbox_dropped 2^70": envelope("bad-2", "heartbeat", 1, {"outbox_dropped": 2**70}),
    "slot is an object": envelope("bad-3", "heartbeat", 1, {"slot": {"a": 1}}),
    "count 2^70": envelope("bad-4", "metrics", 1, {"interval_s": 60, "count": 2**70}),
}


def raw(d: dict) -> bytes:
    return json.dumps(d).encode()


# --------------------------------------------------------------------------- the boundary


@pytest.mark.parametrize("name", sorted(POISON))
def test_out_of_range_or_mistyped_fields_are_refused_at_the_boundary(name):
    with pytest.raises(wire.TelemetryError) as e:
        wire.Envelope.from_json(raw(POISON[name]))
    assert e.value.reason == "schema"


@pytest.mark.parametrize(
    "payload",
    [
        b'{"device": "d", "kind": "heartbeat", "seq": 1, "ts": 1e309, "body": {}}',
        b'{"device": "d", "kind": "heartbeat", "seq": 1, "ts": NaN, "body": {}}',
        b'{"device": "d", "kind": "metrics", "seq": 1, "ts": 1, "body": {"interval_s": Infinity, "count": 1}}',
        b'{"device": "d", "kind": "event", "seq": 1, "ts": 1, "body": {"name": "x", "fields": {"v": -Infinity}}}',
        b"[" * 50_000,
    ],
)
def test_non_finite_numbers_and_hostile_nesting_are_not_json(payload):
    with pytest.raises(wire.TelemetryError) as e:
        wire.Envelope.from_json(payload)
    assert e.value.reason == "json"


def test_sequence_rules_and_bounded_strings():
    for d in (
        envelope("d", "event", 0, {"name": "x"}),  # sequenced kinds start at 1
        envelope("d", "birth", 5, {"session": "s"}),  # connection state is unsequenced
        envelope("d", "metrics", 1, {"interval_s": 1, "count": None}),  # required, not null
        envelope("d", "event", 1, {"name": "x" * 129}),
        envelope("d", "birth", 0, {"session": "s", "group": "../etc"}),
        envelope("d", "heartbeat", 1, {"health": "ok\n"}),
    ):
        with pytest.raises(wire.TelemetryError):
            wire.Envelope.from_json(raw(d))
    with pytest.raises(ValueError):  # an agent cannot send what the server would refuse
        wire.Envelope(device="d", kind="heartbeat", seq=1, ts=float("inf")).to_json()


# --------------------------------------------------------------------------- order by seq and receive time


def test_a_clock_ten_years_ahead_does_not_freeze_the_device_state(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    ahead = time.time() + TEN_YEARS
    store.ingest([wire.Envelope(device="d", kind="heartbeat", seq=1, ts=ahead, epoch="e1", body={"version": "1.0"})])
    store.ingest(
        [wire.Envelope(device="d", kind="heartbeat", seq=2, ts=time.time(), epoch="e1", body={"version": "2.0"})]
    )
    assert store.device("d").version == "2.0"
    # an older heartbeat replayed from the outbox (lower seq) changes nothing, whatever its clock says
    store.ingest(
        [wire.Envelope(device="d", kind="heartbeat", seq=1, ts=ahead + 1, epoch="e1", body={"version": "0.9"})],
        received=time.time() + 1,
    )
    store.ingest(
        [wire.Envelope(device="d", kind="heartbeat", seq=1, ts=ahead + 2, epoch="e0", body={"version": "0.8"})],
        received=time.time() - 60,
    )  # older outbox, received earlier
    assert store.device("d").version == "2.0"
    # a wiped outbox (new epoch) starts again at seq 1 and is followed
    store.ingest(
        [wire.Envelope(device="d", kind="heartbeat", seq=1, ts=0, epoch="e2", body={"version": "3.0"})],
        received=time.time() + 2,
    )
    assert store.device("d").version == "3.0"


# --------------------------------------------------------------------------- against a real broker


def publish(c, d: dict) -> None:
    c.publish(wire.device_topic(d["device"], d["kind"]), raw(d), qos=1).wait_for_publish(5)


def test_poison_messages_are_set_aside_and_good_ones_after_them_are_stored(tmp_path, mqtt_broker):
    store = Store(tmp_path / "store.sqlite")
    ing = Ingest(store, MqttConfig(mqtt_broker.url), client_id="poisoned-server")
    ing.start()
    c = raw_client(mqtt_broker.url, "vandal")
    try:
        assert ing.wait_connected(10)
        for d in POISON.values():
            publish(c, d)
        c.publish(
            wire.device_topic("bad-5", "heartbeat"),
            b'{"device": "bad-5", "kind": "heartbeat", "seq": 1, "ts": 1e309, "body": {}}',
            qos=1,
        ).wait_for_publish(5)
        for seq in (1, 2, 3):
            publish(c, envelope("good", "event", seq, {"name": "after", "fields": {"n": seq}}))
        wait_for(lambda: len(store.events(device="good")) == 3, what="good messages after the poison stored")
        rows = wait_for(lambda: len(q := store.quarantined()) == 5 and q, what="5 messages set aside")
        assert sorted(r.reason for r in rows) == ["json", "schema", "schema", "schema", "schema"]
        assert {r.topic for r in rows} == {
            wire.device_topic(f"bad-{i}", k)
            for i, k in ((1, "event"), (2, "heartbeat"), (3, "heartbeat"), (4, "metrics"), (5, "heartbeat"))
        }
        assert any("outbox_dropped" in r.detail for r in rows) and all(r.payload for r in rows)
        counters = store.counters()
        assert counters["quarantined"] == 5 and counters["malformed_schema"] == 4 and counters["malformed_json"] == 1
        assert 'edgellm_ingest_messages_total{outcome="quarantined"} 5' in prometheus_text(store)
        assert "edgellm_ingest_quarantine_rows 5" in prometheus_text(store)
        assert all(store.device(f"bad-{i}") is None for i in range(1, 6))
    finally:
        ing.stop()
    # Restart: the refused messages were acknowledged, so nothing comes back.
    ing = Ingest(store, MqttConfig(mqtt_broker.url), client_id="poisoned-server")
    ing.start()
    try:
        assert ing.wait_connected(10)
        publish(c, envelope("good", "event", 4, {"name": "after-restart"}))
        wait_for(lambda: store.events(device="good", name="after-restart"), what="stored after restart")
        time.sleep(0.5)
        assert store.quarantine_size() == 5 and ing.counters["received"] == 1
    finally:
        ing.stop()
        c.loop_stop()
        c.disconnect()


def test_a_batch_the_store_refuses_is_split_and_only_the_bad_message_set_aside(tmp_path, mqtt_broker, monkeypatch):
    store = Store(tmp_path / "store.sqlite")
    real = store.ingest

    def refuses_one(envs, received=None):
        if any(e.device == "unstorable" for e in envs):
            raise sqlite3.IntegrityError("constraint failed")  # the data's fault, not the database's
        return real(envs, received)

    monkeypatch.setattr(store, "ingest", refuses_one)
    ing = Ingest(store, MqttConfig(mqtt_broker.url), client_id="split-server", batch_s=0.5)
    ing.start()
    c = raw_client(mqtt_broker.url, "mixed")
    try:
        assert ing.wait_connected(10)
        for i in range(1, 4):
            publish(c, envelope("fine-a", "event", i, {"name": "a"}))
        publish(c, envelope("unstorable", "event", 1, {"name": "boom"}))
        for i in range(1, 4):
            publish(c, envelope("fine-b", "event", i, {"name": "b"}))
        wait_for(lambda: len(store.events(name="a")) == 3 and len(store.events(name="b")) == 3, what="good stored")
        q = wait_for(lambda: store.quarantined(), what="the unstorable message set aside")
        assert [(r.reason, r.topic) for r in q] == [("unstorable", wire.device_topic("unstorable", "event"))]
        assert "IntegrityError" in q[0].detail
        assert ing.counters["malformed_unstorable"] == 1 and ing.counters["store_errors"] == 0
    finally:
        ing.stop()
        c.loop_stop()
        c.disconnect()


def test_quarantine_is_bounded_in_bytes_and_rows(tmp_path, monkeypatch):
    import server.store.telemetry as tables

    store = Store(tmp_path / "s.sqlite")
    monkeypatch.setattr(tables, "QUARANTINE_KEEP", 3)
    store.quarantine([("t", b"x" * (QUARANTINE_PAYLOAD_BYTES * 4), "oversized", "big")] * 5)
    rows = store.quarantined()
    assert len(rows) == 3 and all(
        len(r.payload) == QUARANTINE_PAYLOAD_BYTES and r.size == 4 * QUARANTINE_PAYLOAD_BYTES for r in rows
    )
    assert store.counters()["malformed_oversized"] == 5


def test_the_quarantine_is_readable_over_http(tmp_path):
    import base64
    import urllib.request

    from server.http import HttpServer

    store = Store(tmp_path / "s.sqlite")
    store.quarantine([("edgellm/v1/dev/x/event", b"\x00\xffnot json", "json", "payload is not JSON")] * 3)
    srv = HttpServer(store, None, port=0)
    srv.start()
    try:
        with urllib.request.urlopen(srv.url + "/api/quarantine?limit=-1", timeout=10) as r:
            rows = json.loads(r.read())
    finally:
        srv.stop()
    assert len(rows) == 1  # limits are clamped to 1..1000
    assert rows[0]["reason"] == "json" and base64.b64decode(rows[0]["payload"]) == b"\x00\xffnot json"


def test_a_store_made_by_an_earlier_release_gets_the_new_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE devices (id TEXT PRIMARY KEY, profile TEXT, grp TEXT NOT NULL DEFAULT 'default',"
        " version TEXT, model TEXT, slot TEXT, health TEXT, online INTEGER NOT NULL DEFAULT 0, session TEXT,"
        " state_ts REAL NOT NULL DEFAULT 0, first_seen REAL, last_seen REAL,"
        " outbox_dropped INTEGER NOT NULL DEFAULT 0, outbox_pending INTEGER NOT NULL DEFAULT 0)"
    )
    old.execute("INSERT INTO devices (id, version, state_ts) VALUES ('d', '1.0', 1e300)")  # a clock far ahead
    old.commit()
    old.close()
    store = Store(path)
    store.ingest([wire.Envelope(device="d", kind="heartbeat", seq=1, ts=1.0, body={"version": "2.0"})])
    assert store.device("d").version == "2.0"

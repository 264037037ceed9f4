"""Ingest in bulk: a batch written as a few statements (server.store.batch) changes the store
exactly as its messages written one at a time would (dedupe, registry, device-state order of
decision 0008), on SQLite and PostgreSQL; and the ingest takes more than the broker's default
in-flight window while a batch is being written (MQTT 5 Receive Maximum)."""

from __future__ import annotations

import dataclasses
import threading
import time

from fixtures_mqtt import raw_client
from fixtures_pg import pg_server, pg_url  # noqa: F401  (fixtures; `store` comes from the fixtures_pg plugin)
from waiting import wait_for

from edgellm import telemetry as wire
from edgellm.telemetry import MqttConfig
from server.ingest import Ingest
from server.store import Store


def env(device: str, kind: str, seq: int, body: dict, epoch: str = "e1") -> wire.Envelope:
    return wire.Envelope(device=device, kind=kind, seq=seq, ts=1.0, body=body, epoch=epoch)


def history(p: str) -> list[wire.Envelope]:
    """What the store held before the batch: d1 at seq 10 of epoch e1, a stored event."""
    return [
        env(f"{p}-d1", "birth", 0, {"session": "s1", "profile": "pi", "group": "g", "version": "1", "model": "m"}),
        env(f"{p}-d1", "heartbeat", 10, {"version": "1.5", "slot": "a", "outbox_pending": 4}),
        env(f"{p}-d2", "event", 1, {"name": "seen", "fields": {}}),
    ]


def batch(p: str) -> list[wire.Envelope]:
    d1, d2, d3 = f"{p}-d1", f"{p}-d2", f"{p}-d3"
    return [
        env(d1, "heartbeat", 3, {"version": "old"}),  # older by seq than the stored state: ignored
        env(d2, "event", 1, {"name": "seen", "fields": {}}),  # stored before: a duplicate
        env(d1, "heartbeat", 1, {"version": "2", "slot": "b", "health": "ok", "outbox_dropped": 2}, epoch="e2"),
        env(d3, "event", 1, {"name": "x", "fields": {"k": 1}}),
        env(d1, "heartbeat", 2, {"model": "m2", "profile": ""}, epoch="e2"),  # keeps version 2 and the profile
        env(d1, "metrics", 13, {"interval_s": 60, "count": 5, "p95_latency_ms": 40.0, "version": "2"}),
        env(d1, "heartbeat", 2, {"model": "again"}, epoch="e2"),  # repeated within the batch
        env(d1, "death", 0, {"session": "other"}),  # another connection's will: stays online
        env(d2, "heartbeat", 2, {"version": "d2-v", "group": "g2"}),
        env(d1, "birth", 0, {"session": "s2", "health": "fresh", "version": "2.1"}),
        env(d1, "heartbeat", 11, {"version": "e1-late"}),  # epoch e1 after e2, received later: applies
        env(d3, "event", 1, {"name": "x", "fields": {"k": 1}}),  # repeated within the batch
        env(d1, "heartbeat", 12, {"outbox_pending": 1}),
        env(d2, "death", 0, {"session": "none"}),
        env(d3, "death", 0, {"session": "s9"}),
    ]


def snapshot(store: Store, p: str) -> dict:
    out = {}
    for suffix in ("d1", "d2", "d3"):
        d = store.device(f"{p}-{suffix}")
        row = store.db.execute(
            "SELECT state_epoch, state_seq, state_received FROM devices WHERE id=?", (f"{p}-{suffix}",)
        ).fetchone()
        out[suffix] = (
            {**dataclasses.asdict(d), "id": suffix} if d else None,
            (row[0], row[1], row[2]) if row else None,
            store.message_seqs(f"{p}-{suffix}"),
            [(e.seq, e.name, e.fields) for e in store.events(device=f"{p}-{suffix}")],
            store.metric_summary([f"{p}-{suffix}"], None, 0),
        )
    return out


def test_a_batch_changes_the_store_as_its_messages_one_at_a_time(store):
    t0 = time.time()
    for p in ("bulk", "each"):
        for i, e in enumerate(history(p)):
            store.ingest([e], received=t0 - 100 + i)
    assert store.ingest(batch("bulk"), received=t0) == {"stored": 12, "duplicates": 3}
    results = [store.ingest([e], received=t0) for e in batch("each")]
    assert sum(r["stored"] for r in results) == 12 and sum(r["duplicates"] for r in results) == 3
    bulk, each = snapshot(store, "bulk"), snapshot(store, "each")
    assert bulk == each
    d1 = bulk["d1"][0]
    assert (d1["version"], d1["model"], d1["slot"], d1["health"], d1["profile"]) == (
        "e1-late",
        "m2",
        "b",
        "fresh",
        "pi",
    )
    assert d1["online"] and d1["session"] == "s2" and (d1["outbox_dropped"], d1["outbox_pending"]) == (0, 1)
    assert bulk["d1"][1] == ("e1", 12, t0)
    assert bulk["d2"][0]["group"] == "g2" and bulk["d3"][2] == [1]


def test_a_redelivered_batch_stores_nothing_twice_and_changes_no_state(store):
    msgs = [env("r", "heartbeat", 1, {"version": "1"}), env("r", "event", 2, {"name": "a", "fields": {}})]
    assert store.ingest(msgs) == {"stored": 2, "duplicates": 0}
    store.ingest([env("r", "heartbeat", 1, {"version": "2"}, epoch="e2")])
    # the first batch again, with one new message: only that one is stored; the old heartbeat
    # (another epoch, received later) is a duplicate and must not take the state back
    again = [*msgs, env("r", "event", 3, {"name": "b", "fields": {}})]
    assert store.ingest(again) == {"stored": 1, "duplicates": 2}
    assert store.device("r").version == "2"
    assert store.message_seqs("r") == [1, 2, 3, 1] and [e.name for e in store.events(device="r")] == ["a", "b"]


def test_the_ingest_holds_more_than_the_brokers_default_window_while_a_batch_is_written(tmp_path, mqtt_broker):
    """Mosquitto hands a client at most ``max_inflight_messages`` (20 by default, 100 in the test
    broker) unacknowledged messages unless the client asks for more (Receive Maximum); the ingest
    acknowledges after commit, so without asking, a batch could never exceed that window."""
    store = Store(tmp_path / "s.sqlite")
    real, release, held = store.ingest, threading.Event(), []

    def slow(envs, received=None):
        held.append(len(envs))
        release.wait(30)  # the first batch is being written while more arrives
        return real(envs, received)

    store.ingest = slow  # type: ignore[method-assign]
    ing = Ingest(store, MqttConfig(mqtt_broker.url), client_id="window", batch_size=150)
    ing.start()
    c = raw_client(mqtt_broker.url, "many")
    try:
        assert ing.wait_connected(10) and ing.receive_maximum == 300
        for k in range(1, 301):
            e = env("w", "event", k, {"name": "n", "fields": {}})
            c.publish(wire.device_topic("w", "event"), e.to_json(), qos=1)
        # two batches (300) unacknowledged: more than the test broker's window of 100 (20 by default)
        wait_for(lambda: held and held[0] + ing._q.qsize() == 300, timeout=15, what="two batches in hand")
        release.set()
        wait_for(lambda: store.message_count("w") == 300, timeout=30, what="all stored")
        assert ing.counters["duplicates"] == 0 and ing.counters["batches"] >= 2
    finally:
        release.set()
        ing.stop()
        c.loop_stop()
        c.disconnect()

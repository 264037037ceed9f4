"""The store contract: one suite, run against SQLite and a real PostgreSQL server. Whatever the
server does with its store (ingest, registry, charts, rollouts, tokens, audit, the leader lease)
must behave the same on both."""

from __future__ import annotations

import time

import pytest
from fixtures_pg import pg_server, pg_url  # noqa: F401  (fixtures; `store` comes from the fixtures_pg plugin)

from edgellm import telemetry as wire


def env(device: str, kind: str, seq: int, body: dict, epoch: str = "e1") -> wire.Envelope:
    return wire.Envelope(device=device, kind=kind, seq=seq, ts=time.time(), body=body, epoch=epoch)


def metrics(device: str, seq: int, count: int, p95: float, version: str = "1", errors: int = 0) -> wire.Envelope:
    return env(
        device,
        "metrics",
        seq,
        {
            "interval_s": 60,
            "count": count,
            "errors": errors,
            "p95_latency_ms": p95,
            "p50_latency_ms": p95 / 2,
            "version": version,
            "model": "m",
        },
    )


def test_ingest_deduplicates_on_device_epoch_seq(store):
    batch = [env("d1", "event", 1, {"name": "x"}), env("d1", "event", 2, {"name": "y"})]
    assert store.ingest(batch) == {"stored": 2, "duplicates": 0}
    assert store.ingest(batch + [env("d1", "event", 1, {"name": "x"}, epoch="e2")]) == {"stored": 1, "duplicates": 2}
    assert store.message_seqs("d1") == [1, 2, 1]
    assert store.message_count() == 3 and store.message_count("d1", "event") == 3
    assert store.counters() == {"duplicates": 2, "stored": 3}
    assert [e.name for e in store.events(device="d1")] == ["x", "y", "x"]
    assert store.events_of([], None) == [] and [e.name for e in store.events_of(["d1"], ["y"])] == ["y"]


def test_registry_follows_birth_heartbeat_death(store):
    store.ingest(
        [env("d1", "birth", 0, {"session": "s1", "profile": "pi", "group": "g", "version": "1", "model": "m"})]
    )
    store.ingest([env("d1", "heartbeat", 5, {"version": "2", "outbox_pending": 3})])
    store.ingest([env("d1", "heartbeat", 4, {"version": "old"})])  # older by the device's sequence: ignored
    d = store.device("d1")
    assert d is not None and (d.online, d.group, d.profile, d.version, d.outbox_pending) == (True, "g", "pi", "2", 3)
    assert isinstance(d.last_seen, float) and d.last_seen > 1.6e9  # full precision, not a 4-byte float
    store.ingest([env("d1", "death", 0, {"session": "other"})])
    assert store.device("d1").online  # another session's will
    store.ingest([env("d1", "death", 0, {"session": "s1"})])
    assert not store.device("d1").online
    assert [r.id for r in store.devices(group="g")] == ["d1"] and store.devices(group="none") == []
    assert store.device("nope") is None


def test_metric_summary_and_series(store):
    store.ingest([metrics("d1", 1, 10, 100.0), metrics("d2", 1, 30, 200.0, errors=3), metrics("d2", 2, 5, 1.0, "2")])
    s = store.metric_summary(["d1", "d2"], "1", since=0)
    assert (s.count, s.errors, s.error_rate) == (40, 3, 3 / 40)
    assert s.p95_latency_ms == pytest.approx(175.0) and s.max_p95_latency_ms == 200.0
    assert store.metric_summary([], None, since=0).count == 0
    pts = store.series(by="version", since=0, bucket_s=3600)
    assert {p.key: p.count for p in pts} == {"1": 40, "2": 5}
    assert all(p.t <= time.time() and p.t % 3600 == 0 for p in pts)
    assert {p.key for p in store.series(by="device", since=0)} == {"d1", "d2"}


def test_quarantine_and_prune(store):
    store.quarantine([("edgellm/v1/x", b"\x00" * 5000, "json", "not json"), ("t", b"{}", "schema", "bad")])
    q = store.quarantined()
    assert [r.reason for r in q] == ["schema", "json"] and len(q[1].payload) == 4096 and q[1].size == 5000
    assert store.quarantine_size() == 2 and store.counters()["malformed_json"] == 1
    store.ingest([env("d1", "event", 1, {"name": "x"})], received=time.time() - 1000)
    assert store.prune(500) == 2 and store.message_count() == 0 and store.events() == []  # message + event row


def test_rollouts_compare_and_set(store):
    store.create_rollout("r1", model="m", version="2", group="g", canary_pct=10.0, gate="", bake_s=1.5, state="pending")
    r = store.rollout("r1")
    assert r is not None and (r.state, r.bake_s, r.paused) == ("pending", 1.5, False)
    assert store.set_rollout_state("r1", "canary", expect=r)
    assert not store.set_rollout_state("r1", "canary", expect=r)  # a second driver with the same reading
    store.assign_rollout_devices("r1", [("d1", "canary", "1", "m"), ("d2", "rest", None, None)])
    store.assign_rollout_devices("r1", [("d2", "canary", "0", "m")])
    assert [(d.device, d.phase, d.previous_version) for d in store.rollout_devices("r1")] == [
        ("d1", "canary", "1"),
        ("d2", "canary", "0"),
    ]
    for i in range(3):
        store.log_rollout("r1", "canary", f"m{i}")
    assert [e.message for e in store.rollout_log("r1")] == ["m0", "m1", "m2"]
    store.set_rollout_paused("r1", True)
    store.set_rollout_request("r1", "abort")
    assert store.rollout("r1").paused and store.rollout("r1").request == "abort"
    assert store.rollout_counts() == {"canary": 1}
    assert [x.id for x in store.rollouts(states=["canary"], group="g")] == ["r1"]


def test_tokens_and_audit(store):
    store.add_token("t1", name="ci", role="viewer", token_hash="h1")
    row, h = store.token_hash("t1")
    assert (row.name, row.role, h) == ("ci", "viewer", "h1")
    assert store.revoke_token("t1") and not store.revoke_token("t1")
    assert store.token_hash("t1") is None and store.tokens()[0].revoked is not None
    store.audit(token="t1", who="ci", role="viewer", action="POST /x", target="x", status=403, result="forbidden")
    store.audit(token=None, who="-", role=None, action="POST /y", target="y", status=401, result="x" * 5000)
    log = store.audit_log()
    assert [a.status for a in log] == [401, 403] and len(log[0].result) == 1000


def test_unauthenticated_audit_rows_are_bounded(store, monkeypatch):
    from server.store import control

    monkeypatch.setattr(control, "UNAUTHENTICATED_KEEP", 3)
    store.audit(token="t", who="alice", role="admin", action="POST /x", target="x", status=200, result="ok")
    for i in range(10):
        store.audit(
            token=None, who=control.ANONYMOUS, role=None, action="POST /x", target=str(i), status=401, result=""
        )
    log = store.audit_log()
    assert [a.target for a in log if a.who == control.ANONYMOUS] == ["9", "8", "7"]
    assert [a.who for a in log][-1] == "alice"  # operators' entries are never pushed out


def test_lease_has_one_holder_until_it_expires(store):
    assert store.acquire_lease("leader", "a", 0.5) == 1
    assert store.acquire_lease("leader", "b", 0.5) is None
    assert store.acquire_lease("leader", "a", 0.5) == 1  # renewal keeps the term
    time.sleep(0.6)
    assert store.acquire_lease("leader", "b", 10) == 2
    assert store.acquire_lease("leader", "a", 10) is None
    store.release_lease("leader", "b")
    assert store.acquire_lease("leader", "a", 10) == 3
    assert store.lease_holder("leader")[0] == "a"


def test_reopen_shares_the_database(store):
    other = store.reopen()
    store.count("x", 2)
    assert other.counters() == {"x": 2}
    other.close()


def test_released_connections_are_reused_by_the_next_thread(store):
    import threading

    seen = []

    def request() -> None:
        store.devices()
        if store.dialect.name == "postgresql":
            seen.append(store.db.execute("SELECT pg_backend_pid()").fetchone()[0])
        store.release()

    for _ in range(20):
        t = threading.Thread(target=request)
        t.start()
        t.join()
    if store.dialect.name == "postgresql":
        assert len(set(seen)) == 1  # one connection, handed from thread to thread
    assert store.devices() == []  # the store still works in this thread


def test_a_new_sqlite_file_held_by_another_process_is_opened_once_it_is_free(tmp_path, monkeypatch):
    """Servers starting together on a new SQLite file: switching it to WAL can fail at once with
    "database is locked" instead of waiting. Opening retries (migrations are idempotent)."""
    import sqlite3

    import server.store as store_mod

    real, calls = store_mod.migrate, []

    def busy_once(db, dialect):
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        real(db, dialect)

    monkeypatch.setattr(store_mod, "migrate", busy_once)
    s = store_mod.Store(tmp_path / "new.db")
    assert len(calls) == 2  # refused once, then migrated
    s.quarantine([("d1", b"x", "bad", "t")])  # the schema is there: the store works
    assert s.quarantine_size() == 1
    s.close()

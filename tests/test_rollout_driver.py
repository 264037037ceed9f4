"""The rollout driver step by step, without a broker: the store is real SQLite, the TUF
repository and its director are real (assignments signed on disk), telemetry is ingested
directly, and the MQTT nudges go to an in-memory publisher."""

from __future__ import annotations

import json
import time

import pytest
from fixtures_trust import publish_versions

from edgellm import telemetry as wire
from server import rollout
from server.director import Change, Director
from server.errors import RolloutError
from server.rollout import RolloutDriver
from server.store import Store
from server.yank import yank


class Recorder:
    def __init__(self):
        self.retained: dict[str, bytes] = {}

    def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        assert retain
        self.retained[topic] = payload

    def desired(self, topic: str) -> dict | None:
        p = self.retained.get(topic)
        return json.loads(p) if p else None


class Fleet:
    def __init__(self, store: Store):
        self.store = store
        self.seq: dict[str, int] = {}

    def send(self, device: str, kind: str, body: dict, ts: float | None = None) -> None:
        seq = 0 if kind in ("birth", "death") else self.seq.setdefault(device, 0) + 1
        if seq:
            self.seq[device] = seq
        self.store.ingest([wire.Envelope(device=device, kind=kind, seq=seq, ts=ts or time.time(), body=body)])

    def birth(self, device: str, version: str = "1.0", group: str = "g", online: bool = True) -> None:
        self.send(device, "birth", {"session": "s", "group": group, "version": version, "model": "m"})
        if not online:
            self.send(device, "death", {"session": "s"})

    def report(self, device: str, version: str) -> None:
        self.send(device, "heartbeat", {"version": version, "model": "m"})

    def metrics(self, device: str, version: str, count: int, p95: float, errors: int = 0, lp: float = -1.0) -> None:
        self.send(
            device,
            "metrics",
            {
                "interval_s": 1,
                "count": count,
                "errors": errors,
                "p95_latency_ms": p95,
                "mean_logprob": lp,
                "version": version,
            },
        )


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Keys and a repository with model m at 1.0, 2.0 and 3.0 (fake artifacts: nothing installs them here)."""
    from edgellm.trust import Repository, init_keys

    d = tmp_path_factory.mktemp("repo")
    init_keys(d / "keys")
    publish_versions(Repository.create(d / "repo", d / "keys"), d, ("1.0", "2.0", "3.0"), name="m")
    return d


@pytest.fixture
def env(tmp_path, published):
    import shutil

    shutil.copytree(published / "keys", tmp_path / "keys")
    shutil.copytree(published / "repo", tmp_path / "repo")
    store = Store(tmp_path / "s.sqlite")
    pub = Recorder()
    director = Director(tmp_path / "repo", tmp_path / "keys", store, pub)
    director.apply([Change("group", "g", "m", "1.0")])  # what the group ran before
    return store, Fleet(store), pub, RolloutDriver(store, director, min_samples=10, update_timeout_s=60)


def state(store, rid):
    return rollout.status(store, rid)[0]


def test_canary_prefers_online_devices_and_pins_them(env):
    store, fleet, pub, drv = env
    fleet.birth("a-offline", online=False)
    for d in ("b", "c", "d"):
        fleet.birth(d)
    rid = rollout.start(store, model="m", version="2.0", group="g", canary="50%", bake="1h", no_gate=True)
    drv.tick()
    st = state(store, rid)
    assert st["state"] == "canary" and st["canary_devices"] == 2
    canary = sorted(d["device"] for d in st["device_states"] if d["phase"] == "canary")
    assert canary == ["b", "c"]
    assert pub.desired(wire.desired_device_topic("b"))["version"] == "2.0"
    assert wire.desired_device_topic("a-offline") not in pub.retained
    assert pub.desired(wire.desired_group_topic("g"))["version"] == "1.0"  # the group is not touched yet
    assert drv.director.desired_version("b", "g") == "2.0" and drv.director.desired_version("d", "g") == "1.0"


def test_not_enough_telemetry_keeps_baking_then_rolls_back(env):
    store, fleet, pub, drv = env
    drv.max_bake_factor = 3.0
    fleet.birth("x")
    rid = rollout.start(
        store, model="m", version="2.0", group="g", canary="100%", gate="p95_latency_ms<=100", bake="0.2s"
    )
    drv.tick()
    fleet.report("x", "2.0")
    drv.tick()
    assert state(store, rid)["state"] == "bake"
    fleet.metrics("x", "2.0", count=3, p95=50)  # fine but too few samples
    time.sleep(0.25)
    drv.tick()
    assert state(store, rid)["state"] == "bake"  # bake time is over, but no evidence yet: keep waiting
    time.sleep(0.4)
    drv.tick()
    st = state(store, rid)
    assert st["state"] == "rolling_back" and "not enough telemetry" in st["reason"]
    assert pub.retained[wire.desired_device_topic("x")] == b""  # back to the group's assignment, 1.0
    assert drv.director.desired_version("x", "g") == "1.0"
    fleet.report("x", "1.0")
    drv.tick()
    assert state(store, rid)["state"] == "rolled_back"


def test_late_telemetry_during_the_extended_bake_promotes(env):
    store, fleet, pub, drv = env
    drv.max_bake_factor = 100.0
    fleet.birth("x")
    rid = rollout.start(
        store, model="m", version="2.0", group="g", canary="100%", gate="p95_latency_ms<=100", bake="0.1s"
    )
    drv.tick()
    fleet.report("x", "2.0")
    drv.tick()
    time.sleep(0.15)
    drv.tick()
    assert state(store, rid)["state"] == "bake"
    fleet.metrics("x", "2.0", count=drv.min_samples, p95=50)
    drv.tick()
    assert state(store, rid)["state"] == "full"


def test_gate_judges_only_the_new_version_on_the_canary(env):
    store, fleet, pub, drv = env
    for d in ("p", "q"):
        fleet.birth(d)
    rid = rollout.start(
        store,
        model="m",
        version="2.0",
        group="g",
        canary="50%",
        gate="p95_latency_ms<=100,error_rate<=0.1",
        bake="0.2s",
    )
    drv.tick()
    canary = next(d["device"] for d in state(store, rid)["device_states"] if d["phase"] == "canary")
    other = "q" if canary == "p" else "p"
    fleet.report(canary, "2.0")
    drv.tick()
    fleet.metrics(other, "1.0", count=100, p95=5000, errors=100)  # the old version's troubles do not count
    fleet.metrics(canary, "1.0", count=100, p95=5000)  # nor the canary's before it updated
    fleet.metrics(canary, "2.0", count=50, p95=80, errors=2)
    time.sleep(0.25)
    drv.tick()
    st = state(store, rid)
    assert st["state"] == "full", st["reason"]
    assert pub.desired(wire.desired_group_topic("g"))["version"] == "2.0"
    assert pub.retained[wire.desired_device_topic(canary)] == b""  # pin cleared
    drv.tick()
    assert state(store, rid)["state"] == "full" and state(store, rid)["on_new_version"] == 1
    fleet.report(other, "2.0")
    drv.tick()
    assert state(store, rid)["state"] == "completed"


def test_error_rate_breaks_the_gate_at_once(env):
    store, fleet, pub, drv = env
    fleet.birth("e")
    rid = rollout.start(store, model="m", version="2.0", group="g", canary="100%", gate="error_rate<=0.05", bake="1h")
    drv.tick()
    fleet.report("e", "2.0")
    drv.tick()
    fleet.metrics("e", "2.0", count=20, p95=10, errors=5)
    drv.tick()
    st = state(store, rid)
    assert st["state"] == "rolling_back" and "error_rate=0.25 breaks error_rate<=0.05" in st["reason"]


def test_update_timeout_rolls_back_and_empty_group_fails(env):
    store, fleet, pub, drv = env
    fleet.birth("slow")
    rid = rollout.start(
        store, model="m", version="2.0", group="g", canary="100%", bake="1s", no_gate=True, device_timeout="0.1s"
    )
    drv.tick()
    time.sleep(0.15)
    drv.tick()
    assert "did not reach 2.0 within 0.1s: slow (runs 1.0, online, no update error" in state(store, rid)["reason"]
    rid2 = rollout.start(store, model="m", version="2.0", group="empty", bake="1s", no_gate=True)
    drv.tick()
    st = state(store, rid2)
    assert st["state"] == "failed" and "no devices" in st["reason"]


def test_republish_restores_desired_state_after_the_broker_lost_it(env):
    store, fleet, pub, drv = env
    fleet.birth("r")
    rollout.start(store, model="m", version="2.0", group="g", canary="100%", bake="1h", no_gate=True)
    drv.tick()
    pub.retained.clear()
    drv.republish()
    assert pub.desired(wire.desired_device_topic("r"))["version"] == "2.0"


def test_prune_keeps_recent_telemetry(env):
    store, fleet, pub, drv = env
    fleet.birth("old")
    store.ingest(
        [wire.Envelope(device="old", kind="event", seq=1, ts=0, body={"name": "ancient"})],
        received=time.time() - 90 * 86400,
    )
    fleet.seq["old"] = 1
    fleet.send("old", "event", {"name": "fresh"})
    assert store.prune(30 * 86400) == 2  # its messages row and its events row
    assert [e["name"] for e in store.events(device="old")] == ["fresh"]


def test_rollback_says_which_canary_devices_had_no_earlier_version(env):
    store, fleet, pub, drv = env
    fleet.birth("fresh", version=None, group="new")  # a group nothing was ever assigned to
    rid = rollout.start(
        store, model="m", version="2.0", group="new", canary="100%", gate="p95_latency_ms<=100", bake="1h"
    )
    drv.tick()
    fleet.report("fresh", "2.0")
    drv.tick()
    fleet.metrics("fresh", "2.0", count=drv.min_samples, p95=500)  # breaks the gate
    drv.tick()
    assert state(store, rid)["state"] == "rolling_back"
    drv.tick()
    st = state(store, rid)
    assert st["state"] == "rolled_back"
    last = [h for h in st["history"] if h["state"] == "rolled_back"][-1]["message"]
    assert "fresh had no earlier version and keep 2.0" in last


def test_only_the_canary_devices_failure_events_in_their_one_spelling_roll_back(env):
    store, fleet, pub, drv = env
    for d in ("c1", "r1"):
        fleet.birth(d)
    rid = rollout.start(store, model="m", version="2.0", group="g", canary="50%", bake="1h", no_gate=True)
    drv.tick()
    canary = next(d["device"] for d in state(store, rid)["device_states"] if d["phase"] == "canary")
    rest = "r1" if canary == "c1" else "c1"
    fleet.send(rest, "event", {"name": wire.EventName.UPDATE_FAILED.value, "fields": {"version": "2.0"}})
    fleet.send(canary, "event", {"name": "update_failed", "fields": {"version": "2.0"}})  # not a name we act on
    drv.tick()
    assert state(store, rid)["state"] == "canary"
    fleet.send(
        canary,
        "event",
        {"name": wire.EventName.UPDATE_REFUSED.value, "fields": {"version": "2.0", "reason": "too big"}},
    )
    drv.tick()
    st = state(store, rid)
    assert st["state"] == "rolling_back" and f"{canary}: update.refused (too big)" in st["reason"]


def test_a_rollout_needs_a_gate_or_an_explicit_no_gate(env):
    store, fleet, pub, drv = env
    with pytest.raises(RolloutError, match="needs a gate") as e:
        rollout.start(store, model="m", version="2.0", group="g")
    assert "--no-gate" in e.value.hint
    with pytest.raises(RolloutError, match="contradict"):
        rollout.start(store, model="m", version="2.0", group="g", gate="error_rate<=0.1", no_gate=True)
    with pytest.raises(RolloutError, match="no target for m 9.9"):
        rollout.start(store, model="m", version="9.9", group="g", no_gate=True, director=drv.director)


def test_the_canary_is_drawn_from_online_devices_not_already_on_the_target(env):
    store, fleet, pub, drv = env
    fleet.birth("a", version="2.0")
    fleet.birth("b-off", online=False)
    fleet.birth("c")
    rid = rollout.start(store, model="m", version="2.0", group="g", canary="10%", bake="1h", no_gate=True)
    drv.tick()
    st = state(store, rid)
    assert [d["device"] for d in st["device_states"] if d["phase"] == "canary"] == ["c"]


def test_stages_each_bake_then_the_group_is_assigned(env):
    store, fleet, pub, drv = env
    devs = [f"s{i}" for i in range(4)]
    for d in devs:
        fleet.birth(d)
    rid = rollout.start(
        store, model="m", version="2.0", group="g", canary="25%", stages="50%,100%", bake="0.05s", no_gate=True
    )
    assert state(store, rid)["stages"] == [25.0, 50.0, 100.0]
    seen = []
    for _ in range(30):
        drv.tick()
        st = state(store, rid)
        seen.append((st["state"], st["stage"]))
        for d in devs:
            if drv.director.desired_version(d, "g") == "2.0":
                fleet.report(d, "2.0")
        time.sleep(0.06)
        if st["state"] == "completed":
            break
    assert st["state"] == "completed", st
    assert [x for i, x in enumerate(seen) if x != seen[i - 1] or i == 0] == [
        ("canary", 0),
        ("bake", 0),
        ("canary", 1),
        ("bake", 1),
        ("full", 2),
        ("completed", 2),
    ]
    assert drv.director.of("group", "g").version == "2.0" and all(drv.director.of("device", d) is None for d in devs)
    assert st["final"]["devices"] == 4 and st["on_new_version"] == 4


def test_a_late_device_in_a_later_stage_stalls_the_rollout_with_its_last_error(env):
    store, fleet, pub, drv = env
    for d in ("k1", "k2"):
        fleet.birth(d)
    rid = rollout.start(
        store, model="m", version="2.0", group="g", canary="50%", bake="0.01s", no_gate=True, device_timeout="0.1s"
    )
    drv.tick()
    canary = next(d["device"] for d in state(store, rid)["device_states"] if d["phase"] == "canary")
    late = "k2" if canary == "k1" else "k1"
    fleet.report(canary, "2.0")
    drv.tick()
    time.sleep(0.02)
    drv.tick()  # baked: the group is assigned 2.0
    assert state(store, rid)["state"] == "full"
    fleet.send(late, "event", {"name": "update.failed", "fields": {"version": "2.0", "reason": "disk full"}})
    time.sleep(0.12)
    drv.tick()
    st = state(store, rid)
    assert st["state"] == "stalled" and late in st["reason"] and "disk full" in st["reason"]
    assert [d["last_error"] for d in st["device_states"] if d["device"] == late] == ["2.0: disk full"]
    fleet.report(late, "2.0")
    drv.tick()
    assert state(store, rid)["state"] == "completed"


def test_fleet_rollback_of_a_completed_rollout_and_yank(env):
    store, fleet, pub, drv = env
    fleet.birth("y")
    rid = rollout.start(store, model="m", version="2.0", group="g", canary="100%", bake="0.01s", no_gate=True)
    for _ in range(5):
        drv.tick()
        fleet.report("y", drv.director.desired_version("y", "g"))
        time.sleep(0.02)
    assert state(store, rid)["state"] == "completed"
    rollout.request(store, rid, "rollback")  # the operator takes a completed rollout back
    drv.tick()
    assert drv.director.desired_version("y", "g") == "1.0"
    fleet.report("y", "1.0")
    drv.tick()
    assert state(store, rid)["state"] == "rolled_back"
    # 3.0 reaches the group, then is yanked: the group goes back to 1.0 (2.0 was taken back, but is
    # still the newest earlier assignment that is not yanked)
    drv.director.apply([Change("group", "g", "m", "3.0")])
    moved = yank(store, drv.director, "m", "3.0", reason="bad answers")
    assert moved == ["group g -> 1.0"]
    assert drv.director.desired_version("y", "g") == "1.0"
    with pytest.raises(RolloutError, match="yanked"):
        rollout.start(store, model="m", version="3.0", group="g", no_gate=True)
    with pytest.raises(RolloutError, match="yanked"):
        drv.director.apply([Change("device", "y", "m", "3.0")])

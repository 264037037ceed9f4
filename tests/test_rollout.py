"""Canary rollouts against a real Mosquitto with simulated devices speaking the real protocol
through agent.telemetry.Telemetry: a bad version is stopped at the canary and rolled back by the
server itself; a good version reaches every device of the group."""

from __future__ import annotations

import functools

import httpx
import pytest
from waiting import wait_for as _wait_for

from agent.telemetry.sim import Behaviour, SimDevice
from edgellm.telemetry import MqttConfig
from server import rollout
from server.app import DataDir, Server
from server.rollout import Gate, RolloutError

GATE = "p95_latency_ms<=300,error_rate<=0.05,mean_logprob>=-2.5"
BEHAVIOUR = {
    "1.0": Behaviour(latency_ms=100, mean_logprob=-1.2),
    "2.0-bad": Behaviour(latency_ms=900, mean_logprob=-3.4),  # passes golden prompts, breaks the gate
    "2.0": Behaviour(latency_ms=110, mean_logprob=-1.1),
}


wait_for = functools.partial(_wait_for, timeout=30.0)


def promtool_check(text: str) -> None:
    """``promtool check metrics`` (Debian's prometheus package) accepts the exposition."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr, text)
    assert "edgellm_rollout_state{" in text and 'state="bake"' in text


def server_with(path, versions):
    """A server data directory whose repository has model demo at ``versions`` (fake
    artifacts: the simulated devices only need them to be assignable)."""
    from fixtures_trust import publish_versions

    from edgellm.trust import Repository

    data = DataDir.init(path)
    publish_versions(Repository(data.repo, data.keys), path.parent, versions)
    return data


@pytest.fixture
def fleet(tmp_path, mqtt_broker):
    data = server_with(tmp_path / "server", ["1.0", "2.0-bad", "2.0"])
    srv = Server(data.root, MqttConfig(mqtt_broker.url), http_port=0, tick_s=0.1, min_samples=20)
    srv.start()
    assert srv.ingest.wait_connected(10)
    devices = [
        SimDevice(
            f"sim-{i:02d}",
            tmp_path / f"dev{i}",
            MqttConfig(mqtt_broker.url),
            group="lab",
            behaviour=BEHAVIOUR,
            metrics_interval_s=0.3,
            infer_every_s=0.02,
        ).start()
        for i in range(10)
    ]
    try:
        wait_for(
            lambda: sum(d["online"] and d["version"] == "1.0" for d in srv.store.devices()) == 10,
            what="10 devices online on 1.0",
        )
        yield srv, devices
    finally:
        for d in devices:
            d.stop()
        srv.stop()


@pytest.mark.slow
def test_bad_version_stops_at_canary_and_rolls_back_then_good_version_reaches_all(fleet):
    srv, devices = fleet
    # Arrange / act: a version whose latency and quality break the gate
    rid = rollout.start(srv.store, model="demo", version="2.0-bad", group="lab", canary="20%", gate=GATE, bake="30s")
    # during the bake, the server's /metrics passes Prometheus' own checker
    wait_for(lambda: rollout.status(srv.store, rid)[0]["state"] == "bake", what="bake")
    promtool_check(httpx.get(srv.url + "/metrics", timeout=10).text)
    st = wait_for(
        lambda: (s := rollout.status(srv.store, rid)[0])["state"] == "rolled_back" and s, timeout=40, what="rollback"
    )
    # Assert: only the canary (20% of 10) ever got it, they are back on 1.0, the reason is recorded
    assert st["canary_devices"] == 2
    assert "gate broken" in st["reason"] and "p95_latency_ms" in st["reason"]
    touched = [d for d in devices if "2.0-bad" in d.installs]
    assert len(touched) == 2
    assert {d.id for d in touched} == {x["device"] for x in st["device_states"] if x["phase"] == "canary"}
    wait_for(lambda: all(d["version"] == "1.0" for d in srv.store.devices()), what="all back on 1.0")
    assert all(d.version == "1.0" for d in devices)
    assert all(d.desired[-1]["version"] == "1.0" for d in touched)
    states = [h["state"] for h in st["history"]]
    assert states[:3] == ["pending", "canary", "bake"] and "rolling_back" in states and "full" not in states

    # A good version: canary, bake, then the whole group (the rollback pins are cleared)
    rid2 = rollout.start(srv.store, model="demo", version="2.0", group="lab", canary="20%", gate=GATE, bake="1.5s")
    st2 = wait_for(
        lambda: (s := rollout.status(srv.store, rid2)[0])["state"] in ("completed", "rolled_back") and s,
        timeout=60,
        what="second rollout to finish",
    )
    assert st2["state"] == "completed", st2["reason"]
    assert st2["on_new_version"] == 10
    assert all(d.version == "2.0" for d in devices)
    assert [h["state"] for h in st2["history"]][-2:] == ["full", "completed"]


def test_failed_install_on_canary_rolls_back(tmp_path, mqtt_broker):
    data = server_with(tmp_path / "server", ["1.0", "3.0"])
    with Server(data.root, MqttConfig(mqtt_broker.url), http_port=0, tick_s=0.1) as srv:
        assert srv.ingest.wait_connected(10)
        devs = [
            SimDevice(
                f"f-{i}", tmp_path / f"d{i}", MqttConfig(mqtt_broker.url), group="g", fail_versions=("3.0",)
            ).start(infer=False)
            for i in range(3)
        ]
        try:
            wait_for(lambda: sum(d["online"] for d in srv.store.devices()) == 3, what="3 online")
            rid = rollout.start(
                srv.store, model="demo", version="3.0", group="g", canary="34%", no_gate=True, bake="1s"
            )
            st = wait_for(
                lambda: (s := rollout.status(srv.store, rid)[0])["state"] == "rolled_back" and s,
                what="rollback after failed install",
            )
            assert "update.failed" in st["reason"]
            assert st["canary_devices"] == 2
            assert all(d.version == "1.0" for d in devs)
        finally:
            for d in devs:
                d.stop()


def test_pause_resume_abort(tmp_path, mqtt_broker):
    data = server_with(tmp_path / "server", ["1.0", "4.0", "5.0"])
    with Server(data.root, MqttConfig(mqtt_broker.url), http_port=0, tick_s=0.1) as srv:
        assert srv.ingest.wait_connected(10)
        devs = [
            SimDevice(f"p-{i}", tmp_path / f"d{i}", MqttConfig(mqtt_broker.url), group="g").start(infer=False)
            for i in range(2)
        ]
        try:
            wait_for(lambda: sum(d["online"] for d in srv.store.devices()) == 2, what="2 online")
            rid = rollout.start(
                srv.store, model="demo", version="4.0", group="g", canary="50%", bake="1h", no_gate=True
            )
            with pytest.raises(RolloutError, match="already has an active rollout"):
                rollout.start(srv.store, model="demo", version="5.0", group="g", no_gate=True)
            wait_for(lambda: rollout.status(srv.store, rid)[0]["state"] == "bake", what="bake")
            rollout.request(srv.store, rid, "pause")
            assert rollout.status(srv.store, rid)[0]["paused"]
            rollout.request(srv.store, rid, "resume")
            rollout.request(srv.store, rid, "abort")
            st = wait_for(lambda: (s := rollout.status(srv.store, rid)[0])["state"] == "aborted" and s, what="aborted")
            assert st["reason"] == "aborted by operator"
            wait_for(lambda: all(d.version == "1.0" for d in devs), what="canary back on 1.0")
            with pytest.raises(RolloutError, match="already aborted"):
                rollout.request(srv.store, rid, "resume")
        finally:
            for d in devs:
                d.stop()


def test_gate_parsing():
    g = Gate.parse(GATE)
    assert [str(c) for c in g.clauses] == ["p95_latency_ms<=300", "error_rate<=0.05", "mean_logprob>=-2.5"]
    assert g.broken({"p95_latency_ms": 250, "error_rate": 0.0, "mean_logprob": -1.0}) == []
    assert len(g.broken({"p95_latency_ms": 900, "error_rate": 0.2, "mean_logprob": -3.0})) == 3
    for bad in ("p95<=3", "p95_latency_ms=3", "error_rate<=abc"):
        with pytest.raises(RolloutError):
            Gate.parse(bad)
    assert rollout.parse_percent("10%") == 10.0
    assert rollout.parse_bake("2m") == 120.0
    with pytest.raises(RolloutError, match="not understood") as e:
        rollout.parse_bake("soon")
    assert e.value.hint
    with pytest.raises(RolloutError):
        rollout.parse_percent("0%")

"""Two `edgellm-server run` replicas on one real PostgreSQL and one Mosquitto: telemetry from
several agents (the real agent telemetry code, in the simulator) is shared between them through
the broker's shared subscription and stored once; exactly one replica drives; the leader is killed
with SIGKILL during a canary bake and the rollout finishes under the other, each step once."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys

import httpx
import pytest
from fixtures_mqtt import free_port
from fixtures_pg import pg_server, pg_url  # noqa: F401  (fixtures)
from waiting import wait_for

from agent.telemetry.sim import Behaviour, SimDevice
from edgellm.telemetry import MqttConfig
from server import auth, rollout
from server.app import DataDir
from server.store import Store

BEHAVIOUR = {"1.0": Behaviour(latency_ms=100, mean_logprob=-1.2), "2.0": Behaviour(latency_ms=110, mean_logprob=-1.1)}
GATE = "p95_latency_ms<=300,error_rate<=0.05"


def assert_each_step_once(log) -> None:
    """The rollout went pending → canary → bake → full → completed, and no entry of its history
    was written twice (a quiet bake may add one "waiting for telemetry" entry, once)."""
    states = [h.state for i, h in enumerate(log) if i == 0 or h.state != log[i - 1].state]
    assert states == ["pending", "canary", "bake", "full", "completed"], log
    messages = collections.Counter(h.message.split(" (")[0] for h in log)
    assert max(messages.values()) == 1, log


class Replica:
    def __init__(self, name: str, data, db: str, mqtt: str, log) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "run",
                "--data-dir",
                str(data),
                "--db",
                db,
                "--mqtt",
                mqtt,
                "--http",
                self.url.removeprefix("http://"),
                "--client-id",
                name,
                "--tick",
                "0.2",
                "--leader-ttl",
                "3",
                "--min-samples",
                "5",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )

    def replica(self, token: str) -> dict:
        return httpx.get(self.url + "/api/v1/replica", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()

    def up(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)


@pytest.mark.slow
def test_replicas_share_ingest_and_survive_leader_kill(tmp_path, mqtt_broker, pg_url):  # noqa: F811
    data = DataDir.init(tmp_path / "srv").root
    from fixtures_trust import publish_versions

    from edgellm.trust import Repository

    publish_versions(Repository(data / "repo", data / "keys"), tmp_path, ("1.0", "2.0"))  # what a rollout may assign
    store = Store(pg_url)
    _, token = auth.create_token(store, name="test", role="viewer")
    log = open(tmp_path / "replicas.log", "w")
    replicas = [Replica(n, data, pg_url, mqtt_broker.url, log) for n in ("srv-a", "srv-b")]
    devices: list[SimDevice] = []
    try:
        for r in replicas:
            wait_for(r.up, timeout=60, what=f"{r.name} up")
        devices = [
            SimDevice(
                f"sim-{i}",
                tmp_path / f"d{i}",
                MqttConfig(mqtt_broker.url),
                group="lab",
                behaviour=BEHAVIOUR,
                metrics_interval_s=0.3,
                infer_every_s=0.02,
            ).start()
            for i in range(4)
        ]
        wait_for(
            lambda: sum(d.online and d.version == "1.0" for d in store.devices()) == 4,
            timeout=30,
            what="4 devices online",
        )

        # ingest is shared: both replicas store, nothing twice, nothing lost between them
        wait_for(
            lambda: all(r.replica(token)["ingest"].get("stored", 0) > 0 for r in replicas),
            timeout=30,
            what="both replicas storing telemetry",
        )
        leaders = [r.replica(token)["leader"] for r in replicas]
        assert sorted(leaders) == [False, True]  # exactly one drives
        for d in devices:
            seqs = store.message_seqs(d.id)
            assert len(seqs) == len(set(seqs)) > 0
        assert store.counters().get("duplicates", 0) == 0
        assert store.quarantine_size() == 0  # concurrent batches never refused (no deadlock victim set aside)

        # a rollout; the leader dies (SIGKILL) while the canary bakes
        rid = rollout.start(store, model="demo", version="2.0", group="lab", canary="50%", gate=GATE, bake="5s")
        wait_for(lambda: store.rollout(rid).state == "bake", timeout=30, what="bake")
        holder, _, term = store.lease_holder("leader")
        leader = next(r for r in replicas if holder.startswith(r.name + "@"))
        leader.proc.send_signal(signal.SIGKILL)
        leader.proc.wait(timeout=10)
        survivor = next(r for r in replicas if r is not leader)

        st = wait_for(
            lambda: (row := store.rollout(rid)).state in rollout.FINAL and row,
            timeout=90,
            what="rollout finished under the other replica",
        )
        assert st.state == "completed", st.reason
        holder2, _, term2 = store.lease_holder("leader")
        assert holder2.startswith(survivor.name + "@") and term2 == term + 1
        assert_each_step_once(store.rollout_log(rid))
        assert all(d.version == "2.0" for d in devices)
        # the dead replica's broker session (where the broker queues its share) is taken over and ended
        wait_for(lambda: store.lease_holder(f"ingest:{leader.name}") is None, timeout=60, what="dead session drained")
        assert store.lease_holder(f"ingest:{survivor.name}") is not None
    finally:
        for d in devices:
            d.stop()
        for r in replicas:
            r.stop()
        log.close()
        store.close()


@pytest.mark.slow
def test_real_agent_follows_a_rollout_through_leader_failover(tmp_path, mqtt_broker, pg_url, agent_bundles):  # noqa: F811
    """The same failover with a real `edgellm-agent run` (tiny GGUF model, python-tuf) in the
    canary: it installs through TUF from the surviving replica's repository."""
    import json
    import shutil

    from fixtures_agent import AgentProcess, agent_cli, provision_agent

    data = tmp_path / "srv"
    shutil.copytree(agent_bundles["keys"], data / "keys")
    shutil.copytree(agent_bundles["repo_dir"], data / "repo")
    (data / "server.json").write_text(json.dumps({"format": "edgellm-server", "version": 1}))
    store = Store(pg_url)
    log = open(tmp_path / "replicas.log", "w")
    first = Replica("srv-a", data, pg_url, mqtt_broker.url, log)
    replicas = [first]
    devices: list[SimDevice] = []
    agent = None
    try:
        wait_for(
            lambda: (h := store.lease_holder("leader")) is not None and h[0].startswith("srv-a@"),
            timeout=60,
            what="srv-a leads",
        )
        second = Replica("srv-b", data, pg_url, mqtt_broker.url, log)
        replicas.append(second)
        wait_for(second.up, timeout=60, what="srv-b up")
        d = provision_agent(
            tmp_path / "agent",
            agent_bundles["root"],
            server=second.url,
            args=("--mqtt", mqtt_broker.url, "--group", "lab"),
        )
        agent_cli("install", str(agent_bundles["v1"]), data_dir=d)
        agent = AgentProcess(d)
        devices = [
            SimDevice(
                f"sim-{i}",
                tmp_path / f"d{i}",
                MqttConfig(mqtt_broker.url),
                group="lab",
                model="tiny",
                version="1.0.0",
                metrics_interval_s=0.3,
                infer_every_s=0.02,
            ).start()
            for i in range(2)
        ]
        wait_for(
            lambda: sum(x.online for x in store.devices(group="lab")) == 3 and store.device("dev-1").version == "1.0.0",
            timeout=60,
            what="agent and sims online",
        )

        rid = rollout.start(store, model="tiny", version="1.1.0", group="lab", canary="50%", gate=GATE, bake="6s")
        wait_for(lambda: store.rollout(rid).state == "bake", timeout=120, what="canary installed, baking")
        assert store.device("dev-1").version == "1.1.0"  # the real agent was in the canary
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)

        st = wait_for(
            lambda: (row := store.rollout(rid)).state in rollout.FINAL and row,
            timeout=120,
            what="rollout finished under srv-b",
        )
        assert st.state == "completed", st.reason
        assert store.lease_holder("leader")[0].startswith("srv-b@")
        assert_each_step_once(store.rollout_log(rid))
        assert {x.id: x.version for x in store.devices(group="lab")} == {
            "dev-1": "1.1.0",
            "sim-0": "1.1.0",
            "sim-1": "1.1.0",
        }
    finally:
        if agent is not None:
            agent.stop()
        for x in devices:
            x.stop()
        for r in replicas:
            r.stop()
        log.close()
        store.close()

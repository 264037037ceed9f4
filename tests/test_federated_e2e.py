"""Federated fine-tuning end to end: a real server with its supervised SuperLink, Mosquitto, three
devices (their telemetry client answering ``fl_invite``/``fl_stop`` with the agent's SuperNode
supervisor, as the agent daemon does), real ``flower-supernode`` processes running the ClientApp
on a tiny GGUF model, FedAvg on the server, then merge, build, sign, publish and a canary.

One device's SuperNode is killed after the first round: the run goes on with the two others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("agent.federated.supervisor")

from test_federated_client import make_agent, private_text

from agent.config import AgentConfig
from agent.federated import supervisor
from agent.telemetry.client import Telemetry
from edgellm.bundle import pack
from edgellm.telemetry import MqttConfig
from server.app import DataDir, Server
from server.federated.store import FlStore, RunSettings, status

pytestmark = pytest.mark.slow
GROUP, PROFILE = "lab", "rpi4-4gb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@dataclasses.dataclass
class Device:
    """The agent's side of federated runs: telemetry + the SuperNode supervisor."""

    paths: object
    config: AgentConfig
    telemetry: Telemetry | None = None

    def event(self, kind: str, **fields) -> None:
        assert self.telemetry is not None
        self.telemetry.event(kind, **fields)


def start_device(root: Path, device_id: str, gguf: Path, broker_url: str) -> Device:
    paths = make_agent(root, gguf, data=private_text())
    cfg = dataclasses.replace(AgentConfig.load(paths), device_id=device_id, profile=PROFILE, group=GROUP)
    cfg.save(paths)
    d = Device(paths, cfg)
    d.telemetry = Telemetry(device_id, root / "telemetry", MqttConfig(broker_url), PROFILE, group=GROUP)
    d.telemetry.commands.register("fl_invite", lambda args: supervisor.handle_fl_invite(args, d))
    d.telemetry.commands.register("fl_stop", lambda args: supervisor.handle_fl_stop(args, d))
    d.telemetry.start()
    return d


def publish_base(data: DataDir, gguf: Path, tmp: Path) -> None:
    from edgellm.trust import Repository

    src = tmp / "base-src"
    src.mkdir()
    (src / "model.gguf").write_bytes(gguf.read_bytes())
    (src / "manifest.json").write_text(
        json.dumps(
            {
                "name": "tiny",
                "version": "1.0.0",
                "runtime": "gguf",
                "artifact": "model.gguf",
                "quantization": "q8_0",
                "profiles": [PROFILE],
                "memory": {"context_length": 256},
            }
        )
    )
    Repository(data.repo, data.keys).add_bundle(pack(src, tmp / "tiny-1.0.0.bundle").path)


def _logs(tmp: Path) -> str:
    """The SuperLink's and SuperNodes' logs, for a failure message."""
    out = []
    for p in sorted(tmp.glob("srv/flwr/superlink.log")) + sorted(tmp.glob("agent-*/federated/supernode.log")):
        out.append(f"--- {p.relative_to(tmp)}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(out)


def test_three_devices_fine_tune_one_dies_the_run_publishes_and_canaries(tmp_path, mqtt_broker, tiny_gguf):
    from edgellm.trust import Repository

    # PATH stays as it is: the supervisor puts flower-supernode's directory first, so the SuperNode
    # finds `flower-superexec` without an activated environment.
    data = DataDir.init(tmp_path / "srv")
    publish_base(data, tiny_gguf, tmp_path)
    link = f"127.0.0.1:{free_port()}"
    devices: list[Device] = []
    with Server(data.root, MqttConfig(mqtt_broker.url), http_port=0, tick_s=0.2, fl=link) as srv:
        try:
            for i in range(3):
                devices.append(start_device(tmp_path / f"agent-{i}", f"dev-{i}", tiny_gguf, mqtt_broker.url))
            store = data.store()
            wait_for(lambda: sum(d["online"] for d in store.devices(group=GROUP)) == 3, 30, "three devices online")
            fl = FlStore(store)
            rid = fl.create(
                model="tiny",
                base_version="1.0.0",
                version="1.1.0",
                group=GROUP,
                settings=RunSettings(
                    rounds=2,
                    min_devices=2,
                    local_steps=4,
                    lora_rank=4,
                    lora_alpha=8.0,
                    dp_clip=5.0,
                    dp_noise=0.5,
                    canary="34%",
                    bake="1h",
                    invite_timeout_s=60,
                    round_timeout_s=300,
                ),
            )
            wait_for(lambda: fl.run(rid)["state"] in ("running", "failed"), 90, "devices accepted")
            assert fl.run(rid)["state"] == "running", fl.run(rid)["reason"]
            wait_for(lambda: fl.rounds(rid) or fl.run(rid)["state"] == "failed", 600, "round 1")
            victim = supervisor.current(devices[2].paths)
            if victim is not None and victim.running:
                os.killpg(victim.proc.pid, signal.SIGKILL)  # the device dies mid-run
            final = wait_for(lambda: fl.run(rid)["state"] in ("published", "failed") and fl.run(rid), 1800, "the end")
            st = status(fl, rid)[0]
            assert final["state"] == "published", (
                final["reason"],
                json.dumps(st["history"], indent=1),
                _logs(tmp_path),
            )
        finally:
            supervisor.stop_all("test over")
            for d in devices:
                if d.telemetry is not None:
                    d.telemetry.stop()
        assert srv.fl is not None
    assert len(st["rounds_detail"]) == 2 and all(r["replies"] >= 2 for r in st["rounds_detail"])
    trained = {d["device"] for d in st["devices"] if d["status"] == "trained"}
    assert {"dev-0", "dev-1"} <= trained
    assert all(e["epsilon_total"] > 0 for e in fl.ledger(run_id=rid))
    targets = {t.name: t for t in Repository(data.repo).list_targets()}
    new = [t for t in targets.values() if t.custom["edgellm"]["version"] == "1.1.0"]
    assert new and new[0].custom["edgellm"]["federated"]["run"] == rid
    contributed = {e["device"] for e in fl.ledger(run_id=rid)}  # dev-2 too if its round-1 update made it
    assert trained <= contributed <= {"dev-0", "dev-1", "dev-2"}
    assert set(new[0].custom["edgellm"]["federated"]["device_data_sha256"]) == contributed
    rollout = store.db.execute("SELECT model, version, grp FROM rollouts WHERE id=?", (st["rollout"],)).fetchone()
    assert tuple(rollout) == ("tiny", "1.1.0", GROUP)
    # the canary ships the federated adapter to devices on its base artifact (when it was published)
    adapters = [t for t in new if t.custom["edgellm"].get("kind") == "adapter"]
    assert store.plan(st["rollout"])["release"]["adapter"] == (["federated", "1.1.0"] if adapters else None)

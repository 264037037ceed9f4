"""A device runs what the fleet assigns it, with real processes: `edgellm-agent run` (real tiny
GGUF model, real python-tuf), an edgellm-server (its HTTP repository made before assignments
existed, upgraded with the director role) and a real Mosquitto.

One device polls over HTTP only (no MQTT, as in the README's quickstart), the other is driven
over MQTT. Published versions reach neither until a rollout assigns them; a fleet rollback
brings both back without either rejecting the version left; a later rollout of it completes;
a yanked version is left by every device on it and cannot be rolled out again."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys

import httpx
import pytest
from fixtures_agent import AgentProcess, agent_cli, provision_agent
from waiting import wait_for as _wait_for

from edgellm.telemetry import MqttConfig
from server.app import Server

pytestmark = pytest.mark.slow
wait_for = functools.partial(_wait_for, timeout=120.0, every=0.2)


def server_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def served(a: AgentProcess) -> str | None:
    data = httpx.get(a.base_url + "/v1/models", headers=a.headers, timeout=10).json()["data"]
    return data[0]["version"] if data else None


def status(d) -> dict:
    return json.loads(agent_cli("status", "--format", "json", data_dir=d).stdout)


def test_devices_run_their_assignment_through_rollout_rollback_and_yank(tmp_path, agent_bundles, mqtt_broker):
    data = tmp_path / "srv"
    shutil.copytree(agent_bundles["keys"], data / "keys")
    shutil.copytree(agent_bundles["repo_dir"], data / "repo")  # 1.0.0, 1.1.0, 1.2.0 published, no director yet
    (data / "server.json").write_text(json.dumps({"format": "edgellm-server", "version": 1}))
    dd = ("--data-dir", str(data))
    with Server(data, MqttConfig(mqtt_broker.url), http_port=0, tick_s=0.2, min_samples=1) as srv:
        assert srv.ingest.wait_connected(10)
        poll = provision_agent(
            tmp_path / "poll",
            agent_bundles["root"],
            server=srv.url,
            update_interval_s=1.0,
            args=("--device-id", "dev-poll", "--group", "lab"),
        )
        mqtt = provision_agent(
            tmp_path / "mqtt",
            agent_bundles["root"],
            server=srv.url,
            update_interval_s=3600.0,
            args=("--device-id", "dev-mqtt", "--group", "lab", "--mqtt", mqtt_broker.url),
        )
        for d in (poll, mqtt):
            agent_cli("install", str(agent_bundles["v1"]), data_dir=d)
        with AgentProcess(poll) as a_poll, AgentProcess(mqtt) as a_mqtt:
            wait_for(
                lambda: (x := srv.store.device("dev-mqtt")) and x.online and x.version == "1.0.0",
                what="the MQTT device online on 1.0.0",
            )
            # published, not assigned: the polling device checks and installs nothing
            wait_for(lambda: a_poll.logs().count("no assignment for this device") >= 2, what="two polls")
            assert served(a_poll) == "1.0.0" and served(a_mqtt) == "1.0.0"

            # no gate, no rollout; --no-gate is an explicit choice
            r = server_cli(
                "rollout", "start", *dd, "--model", "tiny", "--version", "1.1.0", "--group", "lab", check=False
            )
            assert r.returncode != 0 and "needs a gate" in r.stderr and "--no-gate" in r.stderr
            rid, st = roll_out(srv, dd, "1.1.0")
            assert [d["device"] for d in st["device_states"] if d["phase"] == "canary"] == ["dev-mqtt"]
            wait_for(lambda: served(a_poll) == "1.1.0", what="the polling device follows its group's assignment")
            assert served(a_mqtt) == "1.1.0"
            view = {v["id"]: v for v in httpx.get(srv.url + "/api/devices", timeout=10).json()}
            assert view["dev-mqtt"]["desired"] == "1.1.0" and view["dev-mqtt"]["drift"] is False

            # the operator's commands reach the device over MQTT and come back
            out = json.loads(server_cli("device", "status", *dd, "dev-mqtt", "--format", "json").stdout)
            assert out["ok"] and out["result"]["version"] == "1.1.0"
            assert server_cli("device", "logs", *dd, "dev-mqtt").stdout.strip()

            # fleet rollback: what the group ran before (1.0.0, from the devices' own history)
            server_cli("rollout", "rollback", *dd, rid)
            wait_for(lambda: served(a_poll) == "1.0.0" and served(a_mqtt) == "1.0.0", what="both back on 1.0.0")
            wait_for(lambda: _status(srv, rid)["state"] == "rolled_back", what="rollback recorded")
            assert status(poll)["rejected"] == [] and status(mqtt)["rejected"] == []

            # the same version again completes
            roll_out(srv, dd, "1.1.0")
            wait_for(lambda: served(a_poll) == "1.1.0", what="the polling device on 1.1.0 again")

            # yank: every device on 1.1.0 leaves it, and no rollout may name it
            out = server_cli("yank", *dd, "--model", "tiny", "--version", "1.1.0", "--reason", "gibberish").stdout
            assert "group lab -> 1.0.0" in out
            wait_for(
                lambda: served(a_poll) == "1.0.0" and served(a_mqtt) == "1.0.0", what="both off the yanked version"
            )
            r = server_cli(
                "rollout",
                "start",
                *dd,
                "--model",
                "tiny",
                "--version",
                "1.1.0",
                "--group",
                "lab",
                "--no-gate",
                check=False,
            )
            assert r.returncode != 0 and "yanked" in r.stderr
            assert status(poll)["rejected"] == [] and status(mqtt)["rejected"] == []
            a_poll.stop()
            a_mqtt.stop()


def roll_out(srv: Server, dd: tuple[str, ...], version: str) -> tuple[str, dict]:
    """`rollout start` (canary 50%, no gate) through the CLI, waited for until it completes."""
    rid = json.loads(
        server_cli(
            "rollout",
            "start",
            *dd,
            "--model",
            "tiny",
            "--version",
            version,
            "--group",
            "lab",
            "--canary",
            "50%",
            "--bake",
            "1s",
            "--no-gate",
            "--format",
            "json",
        ).stdout
    )["id"]
    st = wait_for(
        lambda: (s := _status(srv, rid))["state"] in ("completed", "rolled_back", "failed") and s,
        what=f"{version} rollout",
    )
    assert st["state"] == "completed", st["reason"]
    return rid, st


def _status(srv: Server, rid: str) -> dict:
    from server import rollout

    return rollout.status(srv.store, rid)[0]

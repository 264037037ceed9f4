"""The whole loop with the real device agent: `edgellm-agent run` (real process, real tiny GGUF
model, real python-tuf) provisioned against a running edgellm-server (its HTTP repository and
a real Mosquitto). A rollout of a version whose health check fails is rolled back by the server
after the device reports the failure; a good version is installed through TUF and completes."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
from fixtures_agent import AgentProcess, agent_cli, provision_agent
from waiting import wait_for as _wait_for

from edgellm.telemetry import MqttConfig
from server import rollout
from server.app import Server

wait_for = functools.partial(_wait_for, timeout=60.0)


@pytest.mark.slow
def test_real_agent_follows_server_rollouts(tmp_path, agent_bundles, mqtt_broker):
    # The server's data dir around the fleet's keys and repository (as `init` + `publish` make it).
    data = tmp_path / "srv"
    shutil.copytree(agent_bundles["keys"], data / "keys")
    shutil.copytree(agent_bundles["repo_dir"], data / "repo")
    (data / "server.json").write_text(json.dumps({"format": "edgellm-server", "version": 1}))
    with Server(data, MqttConfig(mqtt_broker.url), http_port=0, tick_s=0.2) as srv:
        assert srv.ingest.wait_connected(10)
        d = provision_agent(
            tmp_path / "agent",
            agent_bundles["root"],
            server=srv.url,
            args=("--mqtt", mqtt_broker.url, "--group", "lab"),
        )
        agent_cli("install", str(agent_bundles["v1"]), data_dir=d)
        with AgentProcess(d) as a:
            wait_for(
                lambda: (x := srv.store.device("dev-1")) and x["online"] and x["version"] == "1.0.0",
                what="agent online on 1.0.0",
            )
            # 1.2.0: signed and published, but its golden prompt cannot pass on the device
            bad = rollout.start(
                srv.store, model="tiny", version="1.2.0", group="lab", canary="100%", bake="1s", no_gate=True
            )
            st = wait_for(
                lambda: (s := rollout.status(srv.store, bad)[0])["state"] in ("rolled_back", "completed") and s,
                timeout=120,
                what="bad rollout to finish",
            )
            assert st["state"] == "rolled_back", st
            assert "dev-1: update.failed" in st["reason"] and "health check" in st["reason"], st["reason"]
            assert srv.store.device("dev-1")["version"] == "1.0.0"
            # 1.1.0 through TUF from the server's own HTTP repository
            good = rollout.start(
                srv.store, model="tiny", version="1.1.0", group="lab", canary="100%", bake="1s", no_gate=True
            )
            st = wait_for(
                lambda: (s := rollout.status(srv.store, good)[0])["state"] in ("rolled_back", "completed") and s,
                timeout=120,
                what="good rollout to finish",
            )
            assert st["state"] == "completed", st["reason"]
            assert srv.store.device("dev-1")["version"] == "1.1.0"
            names = {e["name"] for e in srv.store.events(device="dev-1")}
            assert "update.installed" in names, names
            a.stop()
        wait_for(lambda: not srv.store.device("dev-1")["online"], what="offline after the agent stopped")

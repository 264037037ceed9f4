"""The local API under clients that hold connections open, ids that telemetry would refuse, and the
firmware client when the agent is away. Real `edgellm-agent run` processes and real sockets."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest
from fixtures_agent import AgentProcess, agent_cli, provision_agent
from fixtures_mqtt import free_port
from waiting import wait_for


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except BlockingIOError:
        return False


@pytest.mark.slow
def test_connections_that_never_finish_their_headers_do_not_starve_healthz_or_the_api(tmp_path, agent_bundles):
    d = provision_agent(
        tmp_path / "agent", agent_bundles["root"], limits={"header_timeout_s": "2s", "body_timeout_s": "3s"}
    )
    with AgentProcess(d) as a:
        slow: list[socket.socket] = []
        try:
            for i in range(130):
                s = socket.create_connection(("127.0.0.1", a.port), timeout=5)
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: agent\r\nX-Slow: " + str(i).encode())  # never ends
                slow.append(s)
            body_slow = socket.create_connection(("127.0.0.1", a.port), timeout=5)
            body_slow.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: agent\r\nContent-Length: 1000\r\n"
                b'Content-Type: application/json\r\n\r\n{"prompt": '
            )
            slow.append(body_slow)
            # while all of them are open, liveness and the API still answer
            for _ in range(5):
                r = httpx.get(a.base_url + "/healthz", timeout=10)
                assert r.status_code == 200, r.text
            assert httpx.get(a.base_url + "/v1/models", headers=a.headers, timeout=10).status_code == 200
            # and the agent closes every one of them (read timeouts, oldest evicted first)
            for s in slow:
                s.setblocking(False)
            wait_for(
                lambda: all(_closed_by_peer(s) for s in slow),
                timeout=30,
                what="the agent closes connections that do not send a whole request",
            )
        finally:
            for s in slow:
                s.close()
        # oversized headers are refused, not buffered
        with socket.create_connection(("127.0.0.1", a.port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: agent\r\nX-Big: " + b"a" * 64 * 1024 + b"\r\n\r\n")
            assert s.recv(64).startswith(b"HTTP/1.1 4")
        assert httpx.get(a.base_url + "/healthz", timeout=10).status_code == 200
        metrics = httpx.get(a.base_url + "/metrics", headers=a.headers, timeout=10).text
        for reason in ("slow_client", "connection_limit", "headers_too_large"):
            assert f'edgellm_agent_rejected_requests_total{{reason="{reason}"}}' in metrics, reason
    audit = [json.loads(x) for x in (d / "logs" / "audit.jsonl").read_text().splitlines()]
    assert any(x["endpoint"] == "(gate)" and x["status"] == 431 for x in audit)


@pytest.mark.parametrize("device_id", ["robot 1", "röbot", "a/b", "-lead", "x" * 129, ""])
def test_provisioning_refuses_ids_telemetry_would_refuse_with_the_rule_as_hint(tmp_path, agent_bundles, device_id):
    d = tmp_path / "agent"
    r = agent_cli(
        "provision",
        "--device-id",
        device_id,
        "--profile",
        "rpi4-4gb",
        "--root",
        str(agent_bundles["root"]),
        data_dir=d,
        check=False,
    )
    assert r.returncode == 1, r.stdout
    assert "device id" in r.stderr and "hint: use 1-128 characters of letters, digits" in r.stderr, r.stderr
    assert not (d / "config.json").exists()


def test_provisioning_refuses_a_bad_group_and_a_non_mqtt_broker_url(tmp_path, agent_bundles):
    base = ("provision", "--device-id", "robot-1", "--profile", "rpi4-4gb", "--root", str(agent_bundles["root"]))
    r = agent_cli(*base, "--group", "lab 2", data_dir=tmp_path / "a", check=False)
    assert r.returncode == 1 and "group 'lab 2'" in r.stderr and "hint:" in r.stderr
    r = agent_cli(*base, "--mqtt", "http://broker:1883", data_dir=tmp_path / "b", check=False)
    assert r.returncode == 1 and "mqtt://" in r.stderr
    assert not (tmp_path / "a" / "config.json").exists() and not (tmp_path / "b" / "config.json").exists()


@pytest.mark.slow
def test_telemetry_that_cannot_start_says_so_in_status_and_healthz(tmp_path, agent_bundles):
    # a data dir provisioned by an older agent that accepted such ids
    d = provision_agent(
        tmp_path / "agent", agent_bundles["root"], device_id="robot 1", mqtt={"url": f"mqtt://127.0.0.1:{free_port()}"}
    )
    st = json.loads(agent_cli("status", "--format", "json", data_dir=d).stdout)
    assert st["telemetry"]["state"] == "error" and "device id 'robot 1'" in st["telemetry"]["error"]
    with AgentProcess(d) as a:
        assert httpx.get(a.base_url + "/healthz").json()["telemetry"] == "error"
        tm = httpx.get(a.base_url + "/v1/admin/status", headers=a.admin_headers).json()["telemetry"]
        assert tm["state"] == "error" and "not valid for telemetry" in tm["error"]
        assert "MQTT telemetry is OFF" in a.logs()
    assert "telemetry     error" in agent_cli("status", data_dir=d).stdout


def test_client_names_the_agent_address_from_its_data_dir_when_nobody_answers(tmp_path, monkeypatch):
    from edgellm.client import AgentClient, AgentUnreachable
    from edgellm.errors import EdgeLLMError

    d = tmp_path / "agent"
    d.mkdir()
    (d / "api-token").write_text("tok\n")
    port = free_port()
    (d / "config.json").write_text(
        json.dumps({"device_id": "robot-1", "profile": "rpi4-4gb", "listen": f"127.0.0.1:{port}"})
    )
    monkeypatch.setenv("EDGELLM_AGENT_DIR", str(d))
    c = AgentClient(timeout=5)
    assert (c.host, c.port) == ("127.0.0.1", port)
    with pytest.raises(AgentUnreachable) as e:
        c.models()
    assert isinstance(e.value, EdgeLLMError) and e.value.address == f"http://127.0.0.1:{port}"
    assert f"127.0.0.1:{port}" in str(e.value) and "edgellm-agent run" in e.value.hint
    # a Unix socket from the config, missing: the same error naming the socket
    (d / "config.json").write_text(
        json.dumps(
            {"device_id": "robot-1", "profile": "rpi4-4gb", "listen": None, "socket": str(tmp_path / "nope.sock")}
        )
    )
    with pytest.raises(AgentUnreachable, match="nope.sock"):
        AgentClient(timeout=5).health()
    # no readable token: an EdgeLLMError with a hint, not a bare OSError
    monkeypatch.setenv("EDGELLM_AGENT_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(EdgeLLMError, match="api-token") as e:
        AgentClient()
    assert e.value.hint


@pytest.mark.slow
def test_client_finds_a_running_agent_and_its_admin_token_through_the_data_dir(tmp_path, agent_bundles, monkeypatch):
    from edgellm.client import AgentAPIError, AgentClient

    d = provision_agent(tmp_path / "agent", agent_bundles["root"])
    with AgentProcess(d) as a:
        assert a.port != 8321
        monkeypatch.setenv("EDGELLM_AGENT_DIR", str(d))
        c = AgentClient(timeout=10)
        assert c.health()["status"] == "ok"
        assert c.status()["device_id"] == "dev-1"  # admin call with DIR/admin-token
        with pytest.raises(AgentAPIError) as e:
            AgentClient(timeout=10, admin_token=a.token).status()  # the inference token is not an admin one
        assert e.value.status == 403 and e.value.hint


def test_an_agent_dir_from_before_admin_tokens_gets_one_at_start(tmp_path):
    from agent.config import AgentPaths
    from agent.provision import ensure_admin_token

    paths = AgentPaths(tmp_path)
    token = ensure_admin_token(paths)
    assert len(token) >= 32 and (paths.admin_token.stat().st_mode & 0o777) == 0o600
    assert ensure_admin_token(paths) == token
    assert Path(paths.admin_token).read_text().strip() == token


def test_the_control_planes_update_command_and_desired_state_are_the_same_closed_request(tmp_path):
    from agent.config import AgentConfig, AgentPaths
    from agent.daemon import Daemon
    from agent.schemas import UpdateRequest
    from edgellm.telemetry import Command

    d = Daemon(AgentPaths(tmp_path), AgentConfig(device_id="robot-1", profile="rpi4-4gb"))
    d._start_telemetry()
    run = d.telemetry.commands.run
    reply = run(Command(id="1", name="update", args={"version": "1.0.0", "allow_downgrade": True}))
    assert reply["ok"] is False and "allow_downgrade" in reply["error"] and "rollback" in reply["hint"]
    assert d._desired == UpdateRequest()
    assert run(Command(id="2", name="update", args={"version": "1.0.0", "rollback": True}))["ok"]
    assert d._desired == UpdateRequest(version="1.0.0", rollback=True)
    # desired state over MQTT is a nudge: check the signed assignment; its payload is not trusted
    d._on_desired({"model": "tiny", "version": "1.1.0", "rollout": "r1", "rollback": False, "source": "group"})
    assert d._desired == UpdateRequest()
    d._on_desired({"model": "tiny", "version": "../x"})
    assert d._desired == UpdateRequest()
    assert (
        run(Command(id="3", name="reboot"))["hint"]
        == "this agent knows: fl_invite, fl_stop, logs, retry, rollback, status, update"
    )

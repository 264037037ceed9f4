"""The whole fleet path with real processes: `edgellm-server` (TUF repository over HTTP, MQTT
ingest, rollout driver) + Mosquitto + `edgellm-agent run`. A rollout started on the server
reaches the device as desired state; the agent downloads, verifies, health-checks and hot-swaps
the new version, and the server's registry sees it."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import httpx
import pytest
from fixtures_agent import AgentProcess, provision_agent
from fixtures_mqtt import free_port
from waiting import stop_group
from waiting import wait_for as _wait_for

pytestmark = pytest.mark.slow


def _server_cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


_wait = functools.partial(_wait_for, timeout=60.0)


def test_a_server_rollout_updates_a_real_agent(tmp_path, agent_bundles, mqtt_broker):
    srv_dir = tmp_path / "server"
    _server_cli("init", "--data-dir", str(srv_dir))
    _server_cli(
        "publish",
        "--data-dir",
        str(srv_dir),
        str(agent_bundles["bundles"]["1.0.0"]),
        str(agent_bundles["bundles"]["1.1.0"]),
    )
    http_port = free_port()
    mqtt_url = f"mqtt://127.0.0.1:{mqtt_broker.port}"
    log = open(tmp_path / "server.log", "wb")
    srv = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "run",
            "--data-dir",
            str(srv_dir),
            "--mqtt",
            mqtt_url,
            "--http",
            f"127.0.0.1:{http_port}",
            "--tick",
            "0.2",
            "--min-samples",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server_url = f"http://127.0.0.1:{http_port}"
    try:
        _wait(lambda: _ok(server_url + "/healthz"), what="server up")
        d = provision_agent(
            tmp_path / "agent",
            srv_dir / "keys" / "root.json",
            server=server_url,
            args=("--mqtt", mqtt_url, "--group", "lab"),
        )
        with AgentProcess(d) as a:
            # the device registers itself (birth) with no model yet
            _wait(lambda: _device(server_url), what="device registered")
            out = _server_cli(
                "rollout",
                "start",
                "--data-dir",
                str(srv_dir),
                "--model",
                "tiny",
                "--version",
                "1.1.0",
                "--group",
                "lab",
                "--canary",
                "100%",
                "--bake",
                "1s",
                "--no-gate",
                "--format",
                "json",
            )
            rid = json.loads(out.stdout)["id"]
            _wait(lambda: _served(a) == "1.1.0", what="the agent installs the rolled-out version")
            st = a_status(a)
            assert st["last_update"]["ok"] and st["version"] == "1.1.0"
            r = httpx.post(
                a.base_url + "/v1/completions",
                headers=a.headers,
                json={"model": "tiny", "prompt": "The robot", "max_tokens": 4},
            )
            assert r.status_code == 200 and r.json()["system_fingerprint"] == "edgellm-1.1.0"
            _wait(lambda: (_device(server_url) or {}).get("version") == "1.1.0", what="server sees the new version")
            assert rid
    finally:
        stop_group(srv)
        log.close()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _device(server_url: str) -> dict | None:
    devs = httpx.get(server_url + "/api/devices", timeout=5).json()
    devs = devs if isinstance(devs, list) else devs.get("devices", [])
    return next((x for x in devs if x.get("device") == "dev-1" or x.get("id") == "dev-1"), None)


def _served(a: AgentProcess) -> str | None:
    data = httpx.get(a.base_url + "/v1/models", headers=a.headers, timeout=10).json()["data"]
    return data[0]["version"] if data else None


def a_status(a: AgentProcess) -> dict:
    return httpx.get(a.base_url + "/v1/admin/status", headers=a.admin_headers, timeout=10).json()

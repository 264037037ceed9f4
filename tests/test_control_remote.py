"""The operator API and the remote CLI against a running `edgellm-server run` process: from
another working directory, with only --server and a token, an operator lists devices, starts a
rollout and reads its status, an admin publishes; a viewer token is refused (403), no token is
refused (401), both as JSON errors, and every mutating call is in the audit log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fixtures_mqtt import free_port
from fixtures_trust import make_bundle_dir
from waiting import wait_for

from edgellm.bundle import pack
from server.app import DataDir

CLI = [sys.executable, "-m", "server.cli"]


def cli(*args: str, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("EDGELLM_SERVER_")}
    e.update(env or {})
    r = subprocess.run([*CLI, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def new_token(data: Path, role: str, cwd: Path) -> str:
    out = cli("token", "create", "--data-dir", str(data), "--role", role, "--name", f"{role}-1", cwd=cwd)
    return out.stdout.strip().splitlines()[-1]  # printed once, as the last line


@pytest.fixture
def running(tmp_path, mqtt_broker):
    data = DataDir.init(tmp_path / "srv").root
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            *CLI,
            "run",
            "--data-dir",
            str(data),
            "--mqtt",
            mqtt_broker.url,
            "--http",
            f"127.0.0.1:{port}",
            "--tick",
            "0.2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=30, what="server up")
        yield data, url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        log.close()


@pytest.mark.slow
def test_remote_cli_with_only_server_and_token(running, tmp_path):
    data, url = running
    elsewhere = tmp_path / "laptop"
    elsewhere.mkdir()
    admin, operator, viewer = (new_token(data, r, elsewhere) for r in ("admin", "operator", "viewer"))
    bundle = pack(make_bundle_dir(tmp_path / "b", name="demo", version="2.0.0"), tmp_path / "demo-2.0.0.bundle").path

    # publish (admin), through the environment variables
    pub = cli(
        "publish",
        str(bundle),
        "--format",
        "json",
        cwd=elsewhere,
        env={"EDGELLM_SERVER_URL": url, "EDGELLM_SERVER_TOKEN": admin},
    )
    assert json.loads(pub.stdout)[0]["version"] == "2.0.0"
    # an operator may not publish
    denied = cli("publish", str(bundle), "--server", url, "--token", operator, cwd=elsewhere, check=False)
    assert denied.returncode != 0 and "403" in denied.stderr + denied.stdout

    devs = cli("devices", "--format", "json", "--server", url, "--token", viewer, cwd=elsewhere)
    assert json.loads(devs.stdout) == []

    start = [
        "rollout",
        "start",
        "--model",
        "demo",
        "--version",
        "2.0.0",
        "--group",
        "lab",
        "--no-gate",
        "--format",
        "json",
    ]
    rid = json.loads(cli(*start, "--server", url, "--token", operator, cwd=elsewhere).stdout)["id"]
    st = json.loads(
        cli("rollout", "status", rid, "--format", "json", "--server", url, "--token", viewer, cwd=elsewhere).stdout
    )
    assert st[0]["id"] == rid and st[0]["version"] == "2.0.0"

    # a viewer gets 403 on rollout start, no token 401: the CLI says so and exits non-zero
    r = cli(*start, "--server", url, "--token", viewer, cwd=elsewhere, check=False)
    assert r.returncode != 0 and "403" in r.stderr + r.stdout
    r = cli(*start, "--server", url, cwd=elsewhere, check=False)
    assert r.returncode != 0 and "401" in r.stderr + r.stdout

    # the same over plain HTTP: OpenAI-style JSON errors, the OpenAPI document, the audit log
    body = {"model": "demo", "version": "2.0.0", "group": "other"}
    r401 = httpx.post(url + "/api/v1/rollouts", json=body)
    r403 = httpx.post(url + "/api/v1/rollouts", json=body, headers={"Authorization": f"Bearer {viewer}"})
    assert (r401.status_code, r403.status_code) == (401, 403)
    assert r401.json()["error"]["type"] == "authentication_error" and r403.json()["error"]["code"] == "forbidden"
    assert r403.json()["error"]["hint"]
    spec = httpx.get(url + "/api/v1/openapi.json").json()
    assert spec["paths"]["/api/v1/rollouts"]["post"]["x-role"] == "operator"
    audit = httpx.get(url + "/api/v1/audit", headers={"Authorization": f"Bearer {admin}"}).json()
    seen = [(a["who"], a["action"], a["status"]) for a in audit]
    assert ("operator-1", "POST /api/v1/rollouts", 200) in seen
    assert ("viewer-1", "POST /api/v1/rollouts", 403) in seen
    assert ("(no valid token)", "POST /api/v1/rollouts", 401) in seen
    assert ("admin-1", "POST /api/v1/publish", 200) in seen
    assert all(admin not in json.dumps(a) for a in audit)  # tokens never reach the log

    # revoke: the token stops working at once
    tid = admin.split("_")[1]
    cli("token", "revoke", tid, "--server", url, "--token", admin, cwd=elsewhere)
    assert httpx.get(url + "/api/v1/tokens", headers={"Authorization": f"Bearer {admin}"}).status_code == 401


@pytest.mark.slow
def test_remote_device_command_gets_the_reply(running, tmp_path, mqtt_broker):
    from agent.telemetry.sim import SimDevice
    from edgellm.telemetry import MqttConfig

    data, url = running
    operator = new_token(data, "operator", tmp_path)
    dev = SimDevice("cam-7", tmp_path / "dev", MqttConfig(mqtt_broker.url), group="lab").start(infer=False)
    try:
        remote = ("--server", url, "--token", operator)
        wait_for(
            lambda: any(
                d["id"] == "cam-7" and d["online"]
                for d in json.loads(cli("devices", "--format", "json", *remote, cwd=tmp_path).stdout)
            ),
            timeout=30,
            what="device online",
        )
        out = json.loads(
            cli("device", "command", "cam-7", "ping", "--wait", "20", "--format", "json", *remote, cwd=tmp_path).stdout
        )
        assert out["reply"] == {"id": out["id"], "name": "ping", "ok": True, "result": "pong"}
        r = cli("device", "command", "ghost", "ping", *remote, cwd=tmp_path, check=False)
        assert r.returncode != 0 and "404" in r.stderr + r.stdout
    finally:
        dev.stop()

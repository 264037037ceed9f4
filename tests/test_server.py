"""edgellm-server: init, publish, the repository served over HTTP to a real python-tuf client,
devices / rollout / ca commands, the JSON API and /metrics, and `run` as a real process."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request

import pytest
from click.testing import CliRunner
from waiting import wait_for as _wait_for

from agent.telemetry.sim import SimDevice
from edgellm.telemetry import MqttConfig
from server.app import Server
from server.cli import main


def cli(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


wait_for = functools.partial(_wait_for, timeout=15.0)


@pytest.fixture
def data_dir(tmp_path):
    cli("init", "--data-dir", tmp_path / "srv")
    return tmp_path / "srv"


def test_init_refuses_twice_and_commands_need_an_initialised_dir(tmp_path, data_dir):
    r = cli("init", "--data-dir", data_dir, ok=False)
    assert r.exit_code != 0 and "already initialised" in r.output
    r = cli("devices", "--data-dir", tmp_path / "nope", ok=False)
    assert r.exit_code != 0 and "edgellm-server init" in r.output


def test_published_bundle_is_served_and_verified_by_a_tuf_client_over_http(tmp_path, data_dir, mqtt_broker):
    from fixtures_trust import make_bundle_dir

    from edgellm.bundle import pack
    from edgellm.trust import TufClient

    bundle = pack(make_bundle_dir(tmp_path / "b", name="demo", version="2.0"), tmp_path / "demo-2.0.bundle").path
    r = cli("publish", "--data-dir", data_dir, bundle, "--format", "json")
    assert json.loads(r.output)[0] == {
        "target": "demo-2.0.bundle",
        "model": "demo",
        "version": "2.0",
        "runtime": "gguf",
        "profiles": ["rpi5-8gb"],
    }
    with Server(data_dir, MqttConfig(mqtt_broker.url), http_port=0) as srv:
        client = TufClient(
            tmp_path / "cache", data_dir / "keys" / "root.json", f"{srv.url}/metadata/", f"{srv.url}/targets/"
        )
        client.refresh()
        t = client.download("demo-2.0.bundle", tmp_path / "dl")
        assert t.path.read_bytes() == bundle.read_bytes()
        assert t.edgellm["version"] == "2.0"
        for bad in ("/metadata/..%2Fkeys%2Froot.json", "/targets/.hidden", "/metadata/nope.json", "/etc/passwd"):
            with pytest.raises(urllib.error.HTTPError) as e:
                get(srv.url + bad)
            assert e.value.code == 404


def test_devices_api_metrics_and_rollout_cli(tmp_path, data_dir, mqtt_broker):
    with Server(data_dir, MqttConfig(mqtt_broker.url), http_port=0, tick_s=0.1, min_samples=5) as srv:
        assert srv.ingest.wait_connected(10)
        devs = [
            SimDevice(
                f"cli-{i}",
                tmp_path / f"d{i}",
                MqttConfig(mqtt_broker.url),
                group="lab",
                profile="rpi5-8gb",
                metrics_interval_s=0.2,
            ).start()
            for i in range(2)
        ]
        try:
            wait_for(lambda: sum(d["online"] for d in srv.store.devices()) == 2, what="2 online")
            rows = json.loads(cli("devices", "--data-dir", data_dir, "--format", "json").output)
            assert [(d["id"], d["profile"], d["version"], d["online"], d["group"]) for d in rows] == [
                ("cli-0", "rpi5-8gb", "1.0", True, "lab"),
                ("cli-1", "rpi5-8gb", "1.0", True, "lab"),
            ]
            assert all(d["last_seen"] for d in rows)
            assert "cli-0" in cli("devices", "--data-dir", data_dir).output

            r = cli(
                "rollout",
                "start",
                "--data-dir",
                data_dir,
                "--model",
                "demo",
                "--version",
                "1.1",
                "--group",
                "lab",
                ok=False,
            )
            assert r.exit_code != 0 and "needs a gate" in r.output and "--no-gate" in r.output
            r = cli(
                "rollout",
                "start",
                "--data-dir",
                data_dir,
                "--model",
                "demo",
                "--version",
                "1.1",
                "--group",
                "lab",
                "--no-gate",
                ok=False,
            )
            assert r.exit_code != 0 and "no target for demo 1.1" in r.output
            from fixtures_trust import make_bundle_dir

            from edgellm.bundle import pack

            for v in ("1.1", "1.2"):
                cli(
                    "publish",
                    "--data-dir",
                    data_dir,
                    pack(make_bundle_dir(tmp_path / f"b{v}", version=v), tmp_path / f"demo-{v}.bundle").path,
                )
            rid = json.loads(
                cli(
                    "rollout",
                    "start",
                    "--data-dir",
                    data_dir,
                    "--model",
                    "demo",
                    "--version",
                    "1.1",
                    "--group",
                    "lab",
                    "--canary",
                    "50%",
                    "--gate",
                    "p95_latency_ms<=1000",
                    "--bake",
                    "0.5s",
                    "--format",
                    "json",
                ).output
            )["id"]
            r = cli(
                "rollout",
                "start",
                "--data-dir",
                data_dir,
                "--model",
                "demo",
                "--version",
                "1.2",
                "--group",
                "lab",
                "--no-gate",
                ok=False,
            )
            assert r.exit_code != 0 and "already has an active rollout" in r.output and "hint" in r.output
            assert (
                cli(
                    "rollout",
                    "start",
                    "--data-dir",
                    data_dir,
                    "--model",
                    "demo",
                    "--version",
                    "1.2",
                    "--gate",
                    "latency<3",
                    ok=False,
                ).exit_code
                != 0
            )
            st = wait_for(
                lambda: (
                    (
                        s := json.loads(
                            cli("rollout", "status", "--data-dir", data_dir, rid, "--format", "json").output
                        )[0]
                    )["state"]
                    in ("completed", "rolled_back")
                    and s
                ),
                timeout=30,
                what="rollout finished",
            )
            assert st["state"] == "completed", st["reason"]
            assert st["on_new_version"] == 2
            assert "completed" in cli("rollout", "status", "--data-dir", data_dir, rid).output

            code, ctype, body = get(srv.url + "/api/devices")
            assert code == 200 and ctype == "application/json" and len(json.loads(body)) == 2
            ro = json.loads(get(f"{srv.url}/api/rollouts/{rid}")[2])
            assert ro["state"] == "completed" and ro["history"]
            series = json.loads(get(srv.url + "/api/series?by=version&since=600&bucket=5")[2])
            assert {s["key"] for s in series} >= {"1.0"}
            code, ctype, text = get(srv.url + "/metrics")
            text = text.decode()
            assert ctype.startswith("text/plain")
            assert 'edgellm_devices{group="lab"} 2' in text
            assert 'edgellm_devices_by_version{group="lab",version="1.1"} 2' in text
            assert 'edgellm_devices_desired{group="lab",version="1.1"} 2' in text
            assert 'edgellm_devices_drift{group="lab"} 0' in text
            assert 'edgellm_ingest_messages_total{outcome="stored"}' in text
            assert 'edgellm_rollouts{state="completed"} 1' in text
            with pytest.raises(urllib.error.HTTPError) as e:
                get(srv.url + "/api/series?since=yesterday")
            assert e.value.code == 400
            from prometheus_client.parser import text_string_to_metric_families

            families = {f.name: f for f in text_string_to_metric_families(text)}  # parses cleanly
            assert {"edgellm_devices", "edgellm_devices_online", "edgellm_latency_p95_seconds"} <= set(families)
            assert get(srv.url + "/")[1].startswith("text/html")
        finally:
            for d in devs:
                d.stop()


def test_ca_commands_and_mosquitto_config(tmp_path, data_dir):
    assert "ca.crt" in cli("ca", "init", "--data-dir", data_dir).output
    assert cli("ca", "init", "--data-dir", data_dir, ok=False).exit_code != 0
    r = cli("ca", "issue-device", "--data-dir", data_dir, "robot-7")
    assert (data_dir / "ca" / "devices" / "robot-7.crt").is_file()
    assert "robot-7.key" in r.output
    assert cli("ca", "issue-device", "--data-dir", data_dir, "../evil", ok=False).exit_code != 0
    assert cli("ca", "mosquitto-conf", "--data-dir", data_dir, ok=False).exit_code != 0
    cli("ca", "issue-server", "--data-dir", data_dir, "--host", "127.0.0.1", "--host", "broker.local")
    conf = cli("ca", "mosquitto-conf", "--data-dir", data_dir, "--port", "8883").output
    assert "require_certificate true" in conf and "use_identity_as_username true" in conf
    assert "allow_anonymous false" in conf and f"acl_file {data_dir / 'ca' / 'mosquitto.acl'}" in conf
    assert "pattern write edgellm/v1/dev/%u/#" in (data_dir / "ca" / "mosquitto.acl").read_text()


def test_run_as_a_process_serves_and_stops_on_sigterm(tmp_path, data_dir, mqtt_broker):
    from fixtures_mqtt import free_port

    exe = shutil.which("edgellm-server", path=os.path.dirname(sys.executable)) or shutil.which("edgellm-server")
    cmd = [exe] if exe else [sys.executable, "-m", "server.cli"]
    port = free_port()
    p = subprocess.Popen(
        [*cmd, "run", "--data-dir", str(data_dir), "--mqtt", mqtt_broker.url, "--http", f"127.0.0.1:{port}"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def healthy():
            try:
                return get(f"http://127.0.0.1:{port}/healthz")[0] == 200
            except OSError:
                return False

        wait_for(healthy, timeout=20, what="server HTTP")
        assert json.loads(get(f"http://127.0.0.1:{port}/metadata/timestamp.json")[2])["signed"]["_type"] == "timestamp"
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stderr.close()
    assert p.returncode == 0


def test_init_adopts_existing_keys_and_repository(tmp_path, packed_bundle):
    """Devices provisioned with the operator's root.json follow a server set up later."""
    from click.testing import CliRunner

    from edgellm.trust import Repository, init_keys, verify_bundle_file

    root = init_keys(tmp_path / "keys")
    repo = Repository.create(tmp_path / "repo", tmp_path / "keys")
    repo.add_bundle(packed_bundle)
    r = CliRunner().invoke(
        main,
        [
            "init",
            "--data-dir",
            str(tmp_path / "srv"),
            "--keys",
            str(tmp_path / "keys"),
            "--repo",
            str(tmp_path / "repo"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "srv" / "keys" / "root.json").read_bytes() == root.read_bytes()
    verify_bundle_file(packed_bundle, root, tmp_path / "srv" / "repo")
    r = CliRunner().invoke(main, ["init", "--data-dir", str(tmp_path / "srv2"), "--repo", str(tmp_path / "repo")])
    assert r.exit_code == 1 and "--keys" in r.output and not (tmp_path / "srv2").exists()

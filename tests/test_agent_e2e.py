"""The device agent end to end: real processes, real llama.cpp, real TUF, a tiny real model.

provision -> offline install of a signed bundle -> run -> openai client -> status; bad bundles
never become current while the old model keeps serving; hot swap; rollback; online TUF update.
"""

from __future__ import annotations

import functools
import json
import signal
import stat
import threading
import time
from pathlib import Path

import httpx
import pytest
from fixtures_agent import AgentProcess, agent_cli, provision_agent
from waiting import wait_for as _wait_for

pytestmark = pytest.mark.slow


def _status(d: Path) -> dict:
    return json.loads(agent_cli("status", "--format", "json", data_dir=d).stdout)


_wait = functools.partial(_wait_for, timeout=30.0)


def _served_version(a: AgentProcess) -> str | None:
    data = httpx.get(a.base_url + "/v1/models", headers=a.headers, timeout=10).json()["data"]
    return data[0]["version"] if data else None


class Traffic:
    """Keeps sending completions from a thread; every response must be a 200 with text."""

    def __init__(self, a: AgentProcess) -> None:
        self.a = a
        self.statuses: list[int] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.a.base_url, headers=self.a.headers, timeout=30) as c:
            while not self._stop.is_set():
                r = c.post("/v1/completions", json={"model": "tiny", "prompt": "The robot", "max_tokens": 8})
                self.statuses.append(r.status_code)
                if r.status_code == 200:
                    self.versions.add(r.json()["system_fingerprint"])

    def __enter__(self) -> Traffic:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(30)


def test_provision_install_run_openai_client_and_status(tmp_path, agent_bundles):
    import openai

    from edgellm.client import AgentClient

    d = provision_agent(tmp_path / "agent", agent_bundles["root"])
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(d / "api-token") == 0o600
    assert mode(d / "trust" / "root.json") == 0o444
    assert mode(d / "keys" / "device.key") == 0o600
    assert b"BEGIN CERTIFICATE REQUEST" in (d / "keys" / "device.csr").read_bytes()

    r = agent_cli("install", str(agent_bundles["v1"]), "--format", "json", data_dir=d)
    assert json.loads(r.stdout)["ok"] is True
    st = _status(d)
    assert (st["version"], st["model"], st["slot"], st["health"]) == ("1.0.0", "tiny", "A", "trial")
    assert st["last_update"]["ok"] and st["last_update"]["action"] == "install"
    assert st["health_check"]["tokens_per_second"] > 0 and st["health_check"]["memory_bytes"] > 0
    assert "health check" in agent_cli("status", data_dir=d).stdout

    sock = tmp_path / "run" / "agent.sock"
    with AgentProcess(d, "--socket", str(sock)) as a:
        client = openai.OpenAI(base_url=a.base_url + "/v1", api_key=a.token, max_retries=0)
        models = client.models.list().data
        assert [m.id for m in models] == ["tiny"]
        comp = client.completions.create(model="tiny", prompt="The robot", max_tokens=8)
        assert comp.choices[0].text.strip()
        assert agent_bundles["golden_expect"] in comp.choices[0].text
        assert comp.usage.completion_tokens >= 1 and comp.usage.prompt_tokens >= 1
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip()
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1

        # wrong key -> 401 through the official client too
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=a.base_url + "/v1", api_key="nope", max_retries=0).models.list()

        # the firmware client, over TCP and over the Unix socket (mode 0660)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        for c in (AgentClient(a.base_url, token=a.token), AgentClient(socket_path=sock, token_file=d / "api-token")):
            assert c.complete("The robot", max_tokens=4)["choices"][0]["text"]
            assert "".join(c.stream_chat([{"role": "user", "content": "Hi"}], max_tokens=4))

        # status shows the version; the trial commits after serving for trial_commit_s
        st = _wait(lambda: (s := _status(d))["health"] == "ok" and s, what="trial commit")
        assert st["version"] == "1.0.0" and st["daemon"]["running"] and st["trial"] is None
        metrics = httpx.get(a.base_url + "/metrics", headers=a.headers).text
        for name in (
            "edgellm_agent_requests_total",
            "edgellm_agent_request_duration_seconds_bucket",
            "edgellm_agent_tokens_per_second_bucket",
            "edgellm_agent_queue_depth",
            'edgellm_agent_model_info{model="tiny",runtime="gguf",slot="A",version="1.0.0"} 1.0',
            "process_resident_memory_bytes",
            "edgellm_agent_rss_bytes",
        ):
            assert name in metrics, name
        assert a.stop() == 0  # SIGTERM: clean exit
    assert not sock.exists() and not (d / "run" / "agent.json").exists()
    audit = [json.loads(line) for line in (d / "logs" / "audit.jsonl").read_text().splitlines()]
    gen = [x for x in audit if x["endpoint"] == "/v1/completions" and x["status"] == 200]
    assert gen and all(x["model_version"] == "1.0.0" and x["prompt_tokens"] >= 1 for x in gen)
    assert all("prompt" not in x for x in audit)  # prompt text only if enabled
    assert {x["caller"] for x in audit} >= {"unix"}
    assert any(x["status"] == 401 for x in audit)


def test_an_empty_agent_answers_503_until_a_bundle_is_installed(tmp_path, agent_bundles):
    d = provision_agent(tmp_path / "agent", agent_bundles["root"])
    with AgentProcess(d) as a:
        assert httpx.get(a.base_url + "/healthz").json()["model_loaded"] is False
        assert httpx.get(a.base_url + "/v1/models", headers=a.headers).json()["data"] == []
        r = httpx.post(a.base_url + "/v1/completions", headers=a.headers, json={"model": "tiny", "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded" and r.headers["retry-after"]
        agent_cli("install", str(agent_bundles["v1"]), data_dir=d)
        _wait(lambda: _served_version(a) == "1.0.0", what="the daemon picks up the offline install")
        r = httpx.post(a.base_url + "/v1/completions", headers=a.headers, json={"model": "tiny", "prompt": "hi"})
        assert r.status_code == 200


def test_an_onnx_bundle_installs_and_serves(tmp_path, agent_onnx_bundle):
    import openai

    d = provision_agent(tmp_path / "agent", agent_onnx_bundle["root"])
    agent_cli("install", str(agent_onnx_bundle["envelope"]), data_dir=d)
    st = _status(d)
    assert (st["model"], st["version"], st["runtime"]) == ("tiny-onnx", "2.0.0", "onnx")
    with AgentProcess(d) as a:
        client = openai.OpenAI(base_url=a.base_url + "/v1", api_key=a.token, max_retries=0)
        comp = client.completions.create(model="tiny-onnx", prompt="The robot", max_tokens=8)
        assert comp.choices[0].text.strip() and comp.usage.completion_tokens >= 1
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="tiny-onnx", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, stream=True
            )
        )
        assert text.strip()
        assert a.stop(sig=signal.SIGINT) == 0  # Ctrl-C stops it cleanly too
    assert '"msg": "agent stopped"' in (d / "agent-test.log").read_text()


def test_bad_bundles_never_become_current_and_the_old_model_keeps_serving(tmp_path, agent_bundles):
    d = provision_agent(tmp_path / "agent", agent_bundles["root"])
    agent_cli("install", str(agent_bundles["v1"]), data_dir=d)
    with AgentProcess(d) as a:
        with Traffic(a) as traffic:
            for key, why in (
                ("tampered", "failed verification"),
                ("foreign", "failed verification"),
                ("bad_health", "health check failed"),
            ):
                r = agent_cli("install", str(agent_bundles[key]), data_dir=d, check=False)
                assert r.returncode != 0 and why in r.stderr, (key, r.stderr)
                st = _status(d)
                assert st["version"] == "1.0.0" and st["slot"] == "A", key
                assert st["last_update"]["ok"] is False and why in st["last_update"]["reason"]
                assert _served_version(a) == "1.0.0"
            # a model that aborts the process only takes down the health-check child
            r = agent_cli(
                "install",
                str(agent_bundles["v2"]),
                data_dir=d,
                check=False,
                env={"EDGELLM_AGENT_CRASH_AT": "health_abort"},
            )
            assert r.returncode == 1 and "killed by SIGABRT" in r.stderr, r.stderr
            assert _status(d)["version"] == "1.0.0" and _served_version(a) == "1.0.0"
            assert "1.2.0" in _status(d)["rejected"]
            assert not (d / "slots" / "B").exists()  # the failed slot was wiped
            # a good update hot-swaps while requests are being served (--force: 1.1.0 was rejected above)
            agent_cli("install", "--force", str(agent_bundles["v2"]), data_dir=d)
            _wait(lambda: _served_version(a) == "1.1.0", what="hot swap to 1.1.0")
            time.sleep(0.3)
        assert traffic.statuses and set(traffic.statuses) == {200}, traffic.statuses
        assert {"edgellm-1.0.0", "edgellm-1.1.0"} <= traffic.versions
        assert _status(d)["previous"] == {"slot": "A", "version": "1.0.0"}
        # an older version is refused unless asked for; rollback is the way back
        r = agent_cli("install", str(agent_bundles["v1"]), data_dir=d, check=False)
        assert r.returncode != 0 and "older than the current" in r.stderr
        r = agent_cli("install", str(agent_bundles["v2"]), data_dir=d)  # same version again: a no-op, exit 0
        assert "already current" in r.stdout and "older" in _status(d)["last_update"]["reason"]  # not recorded
        agent_cli("rollback", data_dir=d)
        _wait(lambda: _served_version(a) == "1.0.0", what="rollback to 1.0.0")
        st = _status(d)
        assert st["version"] == "1.0.0" and st["last_update"]["action"] == "rollback"


def test_online_update_through_tuf_with_hot_swap(tmp_path, agent_bundles, tuf_server):
    d = provision_agent(tmp_path / "agent", agent_bundles["root"], server=tuf_server)
    agent_cli("install", str(agent_bundles["v1"]), data_dir=d)
    with AgentProcess(d) as a, Traffic(a) as traffic:
        admin = httpx.Client(base_url=a.base_url, headers=a.admin_headers, timeout=10)
        r = httpx.post(a.base_url + "/v1/admin/update", headers=a.headers, json={"version": "1.1.0", "force": True})
        assert r.status_code == 403  # the inference token cannot ask for updates
        # 1.2.0 fails its health check: stays on 1.0.0, keeps serving
        assert admin.post("/v1/admin/update", json={"version": "1.2.0"}).status_code == 202
        st = _wait(lambda: (s := _status(d))["last_update"]["version"] == "1.2.0" and s, what="1.2.0 attempt")
        assert st["last_update"]["ok"] is False and "health check failed" in st["last_update"]["reason"]
        assert _served_version(a) == "1.0.0"
        # no version asked: what the fleet assigned; this repository has no director, so nothing
        assert admin.post("/v1/admin/update", json={}).status_code == 202
        time.sleep(1.0)
        assert _served_version(a) == "1.0.0"
        assert admin.post("/v1/admin/update", json={"version": "1.1.0"}).status_code == 202
        _wait(lambda: _served_version(a) == "1.1.0", what="online update to 1.1.0")
        st = _status(d)
        assert st["version"] == "1.1.0" and st["last_update"]["ok"]
        # asking for the version in the other slot switches back locally (allowed downgrade)
        admin.post("/v1/admin/update", json={"version": "1.0.0", "rollback": True})
        _wait(lambda: _served_version(a) == "1.0.0", what="asked-for older version")
        assert _status(d)["last_update"]["action"] == "rollback"
    assert traffic.statuses and set(traffic.statuses) == {200}
    # the version left was not rejected (it failed nowhere); 1.2.0, which failed its health check, is
    r = agent_cli("update", "--version", "1.1.0", "--format", "json", data_dir=d)
    assert json.loads(r.stdout)["ok"] and _status(d)["version"] == "1.1.0"
    assert _status(d)["rejected"] == ["1.2.0"]
    r = agent_cli("update", "--version", "1.2.0", data_dir=d, check=False)
    assert r.returncode == 1 and "rejected earlier" in r.stderr
    # with no version, the one-shot check asks for the assignment: there is none here
    r = agent_cli("update", "--format", "json", data_dir=d)
    assert "no version is assigned" in json.loads(r.stdout)["reason"]


def test_unsigned_desired_state_over_mqtt_only_nudges_and_installs_nothing(
    tmp_path, agent_bundles, tuf_server, mqtt_broker
):
    """Anyone who can publish on the broker can say "install 1.1.0"; the agent only checks its
    signed assignment (there is none in this repository), so nothing changes. The signed path
    is tests/test_fleet_assignments.py."""
    import paho.mqtt.client as mqtt

    from edgellm import telemetry as wire

    d = provision_agent(
        tmp_path / "agent",
        agent_bundles["root"],
        server=tuf_server,
        args=("--mqtt", f"mqtt://127.0.0.1:{mqtt_broker.port}", "--group", "lab"),
    )
    assert json.loads((d / "config.json").read_text())["group"] == "lab"
    agent_cli("install", str(agent_bundles["v1"]), data_dir=d)
    seen: list = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: seen.append(wire.Envelope.from_json(m.payload))
    sub.connect("127.0.0.1", mqtt_broker.port)
    sub.subscribe(wire.device_wildcard(), qos=1)
    sub.loop_start()
    try:
        with AgentProcess(d) as a:
            _wait(lambda: any(e.kind == "birth" and e.body.get("version") == "1.0.0" for e in seen), what="birth")
            assert httpx.get(a.base_url + "/healthz").json()["telemetry"] == "connected"
            tm = httpx.get(a.base_url + "/v1/admin/status", headers=a.admin_headers).json()["telemetry"]
            assert tm["state"] == "connected" and tm["error"] is None
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            pub.connect("127.0.0.1", mqtt_broker.port)
            pub.loop_start()
            pub.publish(
                wire.desired_group_topic("lab"),
                wire.Desired(model="tiny", version="1.1.0").to_json(),
                qos=1,
                retain=True,
            ).wait_for_publish(10)
            pub.loop_stop()
            pub.disconnect()
            _wait(lambda: "no assignment for this device" in a.logs(), what="the nudge checked the assignment")
            assert _served_version(a) == "1.0.0"
            assert not any(e.kind == "event" and e.body.get("name") == "update.installed" for e in seen)
    finally:
        sub.loop_stop()
        sub.disconnect()

"""The operator API in process: roles, token hashing, read gating beyond loopback, rollout
actions (rollback included), device commands, bounded bodies, and the leader lease."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from edgellm import telemetry as wire
from server import auth, rollout
from server.api import ApiContext
from server.app import DataDir
from server.http import HttpServer
from server.leader import Leadership


@pytest.fixture
def api(tmp_path):
    data = DataDir.init(tmp_path / "srv")
    store = data.store()
    sent: list[tuple[str, bytes, bool]] = []
    tokens = {r: auth.create_token(store, name=f"{r}-t", role=r)[1] for r in auth.ROLES}

    def serve(host: str = "127.0.0.1") -> str:
        srv = HttpServer(store, data.repo, host, 0, api=ApiContext(data, store, lambda *a: sent.append(a)))
        srv.start()
        servers.append(srv)
        return srv.url.replace("0.0.0.0", "127.0.0.1")

    servers: list[HttpServer] = []
    yield store, tokens, sent, serve
    for s in servers:
        s.stop()


def h(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_tokens_are_stored_hashed_and_checked(api):
    store, tokens, _, _ = api
    raw = store.db.execute("SELECT hash FROM api_tokens").fetchall()
    assert all(t not in json.dumps([r[0] for r in raw]) for t in tokens.values())
    assert auth.authenticate(store, f"Bearer {tokens['operator']}").role == "operator"
    forged = tokens["viewer"][:-4] + "AAAA"
    for bad in (None, "", "Basic x", f"Bearer {forged}", "Bearer edgellm_zz_x"):
        with pytest.raises(auth.AuthError) as e:
            auth.authenticate(store, bad)
        assert e.value.status == 401 and e.value.hint


def test_reads_need_a_token_beyond_loopback(api):
    store, tokens, _, serve = api
    local, wide = serve("127.0.0.1"), serve("0.0.0.0")
    assert httpx.get(local + "/api/devices").status_code == 200
    assert httpx.get(local + "/metrics").status_code == 200
    for path in ("/api/devices", "/metrics", "/api/rollouts"):
        r = httpx.get(wide + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert httpx.get(wide + path, headers=h(tokens["viewer"])).status_code == 200
    assert httpx.get(wide + "/").status_code == 200 and httpx.get(wide + "/healthz").status_code == 200
    assert httpx.get(local + "/api/v1/devices").status_code == 401  # the v1 API always wants a token


def test_operator_actions_and_commands(api):
    store, tokens, sent, serve = api
    url = serve()
    store.ingest([wire.Envelope(device="d1", kind="birth", seq=0, ts=time.time(), body={"session": "s", "group": "g"})])
    rid = rollout.start(store, model="demo", version="2", group="g", no_gate=True)
    op = h(tokens["operator"])
    assert httpx.post(f"{url}/api/v1/rollouts/{rid}/pause", headers=op).status_code == 200
    assert store.rollout(rid).paused
    assert httpx.post(f"{url}/api/v1/rollouts/{rid}/rollback", headers=op).json()["requested"] == "rollback"
    assert store.rollout(rid).request == "rollback"
    assert httpx.post(f"{url}/api/v1/rollouts/nope/pause", headers=op).status_code == 404
    assert httpx.post(f"{url}/api/v1/rollouts/{rid}/explode", headers=op).status_code == 400
    assert httpx.post(f"{url}/api/v1/rollouts/{rid}/abort", headers=h(tokens["viewer"])).status_code == 403

    r = httpx.post(f"{url}/api/v1/devices/d1/commands", headers=op, json={"name": "ping"})
    assert r.status_code == 200 and sent[-1][0] == wire.command_topic("d1")
    assert wire.Command.from_dict(json.loads(sent[-1][1])).id == r.json()["id"]
    assert httpx.post(f"{url}/api/v1/devices/ghost/commands", headers=op, json={"name": "ping"}).status_code == 404
    assert httpx.post(f"{url}/api/v1/devices/d1/commands", headers=op, json={"name": "../x"}).status_code == 400
    assert httpx.post(f"{url}/api/v1/devices/d1/commands", headers=op, content=b"[1]").status_code == 400
    big = httpx.post(f"{url}/api/v1/devices/d1/commands", headers=op, content=b"x" * (65 * 1024))
    assert big.status_code == 413 and len(sent) == 1


def test_only_admins_manage_tokens(api):
    store, tokens, _, serve = api
    url = serve()
    body = {"name": "new", "role": "viewer"}
    assert httpx.post(url + "/api/v1/tokens", json=body, headers=h(tokens["operator"])).status_code == 403
    made = httpx.post(url + "/api/v1/tokens", json=body, headers=h(tokens["admin"])).json()
    assert httpx.get(url + "/api/v1/whoami", headers=h(made["token"])).json()["role"] == "viewer"
    assert (
        httpx.post(url + "/api/v1/tokens", json={"name": "x", "role": "root"}, headers=h(tokens["admin"])).status_code
        == 400
    )
    assert made["token"] not in json.dumps([a.to_dict() for a in store.audit_log()])


def test_leadership_is_exclusive_and_taken_over(tmp_path):
    store = DataDir.init(tmp_path / "srv").store()
    a, b = Leadership(store, "a", ttl_s=0.5), Leadership(store.reopen(), "b", ttl_s=0.5)
    assert a.check() and a.is_leader
    assert not b.check() and not b.is_leader
    time.sleep(0.6)  # a stops renewing (as if killed)
    assert b.check() and b.term == 2
    assert not a.check() and not a.is_leader


def test_federated_runs_need_a_role_and_the_federated_package(api):
    store, tokens, _, serve = api
    url = serve()
    assert httpx.post(url + "/api/v1/fl/runs", json={}, headers=h(tokens["viewer"])).status_code == 403
    r = httpx.get(url + "/api/v1/fl/runs", headers=h(tokens["viewer"]))
    try:
        import server.federated.store  # noqa: F401
    except ImportError:
        assert r.status_code == 501 and r.json()["error"]["hint"]
    else:
        assert r.status_code == 200
    err = httpx.post(url + "/api/v1/rollouts", json={"model": "x"}, headers=h(tokens["operator"])).json()["error"]
    assert "hint:" not in err["message"] and err["hint"]  # the hint has its own field


@pytest.mark.skipif(__import__("shutil").which("promtool") is None, reason="promtool not installed (Debian prometheus)")
def test_metrics_pass_promtool_with_a_viewer_token_beyond_loopback(api):
    import subprocess

    store, tokens, _, serve = api
    store.ingest(
        [wire.Envelope(device="d1", kind="birth", seq=0, ts=time.time(), body={"session": "s", "version": "1"})]
    )
    text = httpx.get(serve("0.0.0.0") + "/metrics", headers=h(tokens["viewer"])).text
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'edgellm_devices_by_version{group="default",version="1"} 1' in text


def test_one_writer_of_the_repository_at_a_time(api, tmp_path):
    from fixtures_trust import make_bundle_dir

    from edgellm.bundle import pack

    store, tokens, _, serve = api
    url = serve()
    bundle = pack(make_bundle_dir(tmp_path / "b", version="3.0"), tmp_path / "demo-3.0.bundle").path

    def post() -> httpx.Response:
        return httpx.post(
            url + "/api/v1/publish?filename=demo-3.0.bundle", content=bundle.read_bytes(), headers=h(tokens["admin"])
        )

    assert store.acquire_lease("publish", "another-replica", 60) is not None
    busy = post()
    assert busy.status_code == 409 and "try again" in busy.json()["error"]["hint"]
    store.release_lease("publish", "another-replica")
    assert post().json()["version"] == "3.0"
    assert (
        httpx.post(url + "/api/v1/publish?filename=../x", content=b"x", headers=h(tokens["admin"])).status_code == 400
    )

"""The `edgellm-server` CLI on both targets (the data directory here, or a server's API): token
commands, the fleet CA issued remotely (the key lands with the caller, never kept on the
server), and where a command acts when told both or neither."""

from __future__ import annotations

import os
import stat

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import NameOID

from server import auth
from server.api import ApiContext
from server.app import DataDir
from server.cli import main
from server.http import HttpServer


def run(*args: str, ok: bool = True):
    r = CliRunner().invoke(main, list(args), env={k: None for k in os.environ if k.startswith("EDGELLM_SERVER_")})
    assert (r.exit_code == 0) == ok, r.output
    return r


@pytest.fixture
def server(tmp_path):
    data = DataDir.init(tmp_path / "srv")
    store = data.store()
    srv = HttpServer(store, data.repo, port=0, api=ApiContext(data, store))
    srv.start()
    yield data, srv.url
    srv.stop()


def test_token_commands(server):
    data, _ = server
    out = run("token", "create", "--data-dir", str(data.root), "--role", "operator", "--name", "alice").output
    token = out.strip().splitlines()[-1]
    assert auth.authenticate(data.store(), f"Bearer {token}").role == "operator"
    listed = run("token", "list", "--data-dir", str(data.root)).output
    assert "alice" in listed and token not in listed
    audit = run("audit", "--data-dir", str(data.root), "--format", "json").output
    assert '"cli token create"' in audit and '"local:' in audit and token not in audit  # changes on the host too
    run("token", "create", "--data-dir", str(data.root), "--role", "root", "--name", "x", ok=False)
    run("token", "create", "--data-dir", str(data.root), "--role", "viewer", "--name", "../x", ok=False)


def test_fleet_ca_remotely(server, tmp_path, monkeypatch):
    data, url = server
    admin = auth.create_token(data.store(), name="adm", role="admin")[1]
    op = auth.create_token(data.store(), name="op", role="operator")[1]
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    monkeypatch.chdir(laptop)
    remote = ("--server", url, "--token", admin)
    run("ca", "init", *remote)
    assert (data.ca / "ca.crt").is_file()
    run("ca", "issue-device", "robot-7", "--server", url, "--token", op, ok=False)  # admin only
    run("ca", "issue-device", "robot-7", *remote)
    cert = x509.load_pem_x509_certificate((laptop / "robot-7.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "robot-7"
    assert stat.S_IMODE((laptop / "robot-7.key").stat().st_mode) == 0o600
    assert not list(data.ca.rglob("robot-7.key"))  # the server kept no copy of the key
    r = run("ca", "issue-device", "edgellm-server", *remote, ok=False)  # reserved name
    assert "reserved" in r.output
    run("ca", "issue-server", "--host", "127.0.0.1", "--out", str(laptop / "broker"), *remote)
    run("ca", "mosquitto-conf", *remote, ok=False)  # no broker cert in the server's CA dir yet
    run("ca", "issue-server", "--host", "127.0.0.1", "--data-dir", str(data.root))
    conf = run("ca", "mosquitto-conf", *remote).output
    assert "require_certificate true" in conf and (data.ca / "mosquitto.acl").is_file()


def test_where_a_command_acts(server, tmp_path):
    data, url = server
    r = run("devices", "--data-dir", str(data.root), "--server", url, ok=False)
    assert "not both" in r.output
    r = run("devices", ok=False)
    assert "--server URL --token T" in r.output
    r = run("devices", "--server", url, ok=False)
    assert "401" in r.output and "token" in r.output
    run("rollout", "status", "nope", "--data-dir", str(data.root), ok=False)


def test_federated_runs_remotely(server, tmp_path):
    import json

    from fixtures_trust import make_bundle_dir

    from edgellm.bundle import pack
    from server import ops

    data, url = server
    store = data.store()
    ops.publish(
        data.repo,
        data.keys,
        store,
        pack(make_bundle_dir(tmp_path / "b", name="tiny", version="1.0.0"), tmp_path / "tiny.bundle").path,
    )
    op = auth.create_token(store, name="op", role="operator")[1]
    viewer = auth.create_token(store, name="v", role="viewer")[1]
    start = (
        "fl",
        "start",
        "--model",
        "tiny",
        "--version",
        "1.0.0",
        "--publish",
        "1.1.0",
        "--group",
        "lab",
        "--rounds",
        "2",
        "--no-gate",
        "--format",
        "json",
        "--server",
        url,
    )
    assert "403" in run(*start, "--token", viewer, ok=False).output
    rid = json.loads(run(*start, "--token", op).output)["id"]
    rows = json.loads(run("fl", "status", "--server", url, "--token", viewer, "--format", "json").output)
    assert [(r["id"], r["state"], r["rounds"]) for r in rows] == [(rid, "pending", 2)]
    assert rid in run("fl", "status", rid, "--data-dir", str(data.root)).output
    bad = run(
        "fl",
        "start",
        "--model",
        "tiny",
        "--version",
        "9.9",
        "--publish",
        "10.0",
        "--no-gate",
        "--server",
        url,
        "--token",
        op,
        ok=False,
    )
    assert "no bundle of tiny 9.9" in bad.output and "hint" in bad.output

"""The fleet commands through the operator API (`--server URL --token T`), as on the server
host: rollout start with stages and the gate rules, devices with desired/drift, a device's
group, yank; a viewer is refused every change."""

from __future__ import annotations

import json
import time

import pytest
from fixtures_trust import publish_versions
from test_control_cli import run

from edgellm import telemetry as wire
from server import auth
from server.api import ApiContext
from server.app import DataDir
from server.http import HttpServer


@pytest.fixture
def fleet(tmp_path):
    from edgellm.trust import Repository

    data = DataDir.init(tmp_path / "srv")
    publish_versions(Repository(data.repo, data.keys), tmp_path, ("1.0", "2.0"))
    store = data.store()
    for d in ("d1", "d2"):
        store.ingest(
            [
                wire.Envelope(
                    device=d,
                    kind="birth",
                    seq=0,
                    ts=time.time(),
                    body={"session": "s", "group": "lab", "version": "1.0", "model": "demo"},
                )
            ]
        )
    srv = HttpServer(store, data.repo, port=0, api=ApiContext(data, store))
    srv.start()
    yield data, srv.url
    srv.stop()


def test_fleet_commands_through_the_api(fleet):
    data, url = fleet
    op = ("--server", url, "--token", auth.create_token(data.store(), name="op", role="operator")[1])
    viewer = ("--server", url, "--token", auth.create_token(data.store(), name="v", role="viewer")[1])
    start = ("rollout", "start", "--model", "demo", "--version", "2.0", "--group", "lab", "--format", "json")
    assert "needs a gate" in run(*start, *op, ok=False).output
    assert "403" in run(*start, "--no-gate", *viewer, ok=False).output
    rid = json.loads(
        run(
            *start, "--canary", "50%", "--stages", "50%,100%", "--gate", "error_rate<=0.1", "--min-samples", "5", *op
        ).output
    )["id"]
    st = json.loads(run("rollout", "status", rid, "--format", "json", *viewer).output)[0]
    assert st["stages"] == [50.0, 100.0] and st["min_samples"] == 5 and st["state"] == "pending"
    run("rollout", "abort", rid, *op)

    run("device", "group", "d2", "field", *op)
    rows = {r["id"]: r for r in json.loads(run("devices", "--format", "json", *viewer).output)}
    assert rows["d2"]["group"] == "field" and rows["d1"]["desired"] is None and rows["d1"]["drift"] is False

    assert "403" in run("yank", "--model", "demo", "--version", "2.0", *viewer, ok=False).output
    assert "yanked demo 2.0" in run("yank", "--model", "demo", "--version", "2.0", *op).output
    assert "yanked" in run(*start, "--no-gate", *op, ok=False).output
    audit = run("audit", "--data-dir", str(data.root), "--format", "json").output
    assert "/api/v1/yank" in audit and "/api/v1/devices/d2/group" in audit

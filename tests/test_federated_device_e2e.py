"""Device side of a real federated run: a real SuperLink, two agents invited through
``handle_fl_invite`` (each starting a real ``flower-supernode``), ``flwr run`` of an app whose
ClientApp is ``agent.federated.client_app:app`` and whose ServerApp is Flower's own FedAvg over
the contract's messages (the fleet's ServerApp is tested with the server)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("flwr")

from test_federated_client import make_agent, sha256
from test_federated_supervisor import Ctx

from agent.config import AgentConfig
from agent.federated import supervisor

BIN = Path(sys.executable).parent

SERVER_APP = """
import json
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from edgellm.pipeline import lora
    from edgellm.pipeline.gguf_load import _reader, gguf_config

    rc = context.run_config
    init = lora.initial_lora_state(gguf_config(_reader(rc["gguf"])), lora.LoraConfig(4, 8.0), seed=0)
    conf = ConfigRecord({"run-id": "e2e", "lora-rank": 4, "lora-alpha": 8.0, "local-steps": 10, "lr": 3e-3,
                         "base-version": "1.0.0", "base-sha256": rc["sha"], "dp-clip": 0.0, "seed": 0})
    res = FedAvg(min_available_nodes=2, min_train_nodes=2, min_evaluate_nodes=2).start(
        grid=grid, initial_arrays=ArrayRecord(init), num_rounds=2, train_config=conf, evaluate_config=conf,
        timeout=600)
    out = {"train": {r: dict(m) for r, m in res.train_metrics_clientapp.items()},
           "evaluate": {r: dict(m) for r, m in res.evaluate_metrics_clientapp.items()}, "keys": len(res.arrays)}
    open(rc["out"], "w").write(json.dumps(out))
"""

PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgellm-device-e2e"
version = "0.1.0"
description = "test app"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "edgellm"

[tool.flwr.app.components]
serverapp = "e2e_server:app"
clientapp = "agent.federated.client_app:app"

[tool.flwr.app.config]
gguf = ""
sha = ""
out = ""
"""


def wait_listening(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"the SuperLink did not listen on {port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_devices_train_adapters_through_a_real_superlink(tmp_path, tiny_gguf) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "e2e_server.py").write_text(SERVER_APP)
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    link = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        start_new_session=True,
        stdout=open(tmp_path / "superlink.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    ctxs = []
    try:
        wait_listening(port)
        for i, color in enumerate(("red", "blue")):
            texts = [f"The {color} lamp in room {j % 4} blinks {j % 3 + 1} times." for j in range(80)]
            paths = make_agent(tmp_path / f"agent{i}", tiny_gguf, data=texts)
            cfg = AgentConfig.load(paths)
            cfg.device_id = f"dev-{i}"
            cfg.save(paths)
            ctxs.append(Ctx(paths, cfg))
        for c in ctxs:
            invite = {
                "run_id": "e2e",
                "superlink": f"127.0.0.1:{port}",
                "base_version": "1.0.0",
                "base_sha256": sha256(tiny_gguf),
            }
            assert supervisor.handle_fl_invite(invite, c) == {"accepted": True, "reason": ""}
        out = tmp_path / "result.json"
        r = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(app),
                "local",
                "--stream",
                "--run-config",
                f'gguf="{tiny_gguf}" sha="{sha256(tiny_gguf)}" out="{out}"',
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.exists(), r.stdout[-3000:] + r.stderr[-2000:]
        res = json.loads(out.read_text())
        pids = [supervisor.current(c.paths).proc.pid for c in ctxs]
    finally:
        for c in ctxs:
            supervisor.handle_fl_stop({"run_id": "e2e"}, c)
        os.killpg(link.pid, signal.SIGTERM)
        link.wait(30)
    for rnd in ("1", "2"):
        assert res["train"][rnd]["heldout-loss-after"] < res["train"][rnd]["heldout-loss-before"]
    assert res["evaluate"]["2"]["heldout-loss"] < res["evaluate"]["1"]["heldout-loss"]
    assert res["keys"] == 2 * 7 * 2
    for c, pid in zip(ctxs, pids, strict=True):
        assert [e[1]["state"] for e in c.events][:1] == ["started"]
        deadline = time.monotonic() + 10
        while supervisor._is_supernode(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not supervisor._is_supernode(pid)

"""The SuperNode supervisor: a real ``flower-supernode`` started, watched and stopped as a group.

The SuperLink address points at a closed port: the SuperNode keeps retrying, which is all these
tests need (the federated end-to-end run lives with the server side).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_federated_client import make_agent, private_text, sha256

from agent.config import AgentConfig, AgentPaths
from agent.federated import supervisor

pytest.importorskip("flwr")


@dataclasses.dataclass
class Ctx:
    paths: AgentPaths
    config: AgentConfig
    events: list = dataclasses.field(default_factory=list)

    def event(self, kind: str, **fields) -> None:
        self.events.append((kind, fields))


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def ctx(tmp_path, tiny_gguf):
    paths = make_agent(tmp_path / "agent", tiny_gguf, data=private_text(10))
    c = Ctx(paths, AgentConfig.load(paths))
    yield c
    supervisor.stop_all("test over")


def invite(ctx: Ctx, run_id: str = "run-1", **kw) -> dict:
    payload = {
        "run_id": run_id,
        "superlink": closed_port(),
        "base_version": "1.0.0",
        "base_sha256": sha256(ctx.paths.slot_dir("A") / "model.gguf"),
        **kw,
    }
    return supervisor.handle_fl_invite(payload, ctx)


def test_invite_starts_a_supernode_in_its_own_group_and_stop_ends_the_group(ctx) -> None:
    assert invite(ctx) == {"accepted": True, "reason": ""}
    node = supervisor.current(ctx.paths)
    assert node is not None and node.running
    pgid = node.proc.pid
    assert os.getpgid(pgid) == pgid != os.getpgid(0)
    assert ctx.events[0][0] == "fl_state" and ctx.events[0][1]["state"] == "started"
    cfg = (ctx.paths.root / "federated" / "node-config.toml").read_text()
    assert 'device-id = "dev-7"' in cfg and str(ctx.paths.root) in cfg
    assert (ctx.paths.root / "federated" / "flwr-home").is_dir()

    assert invite(ctx, "run-2") == {
        "accepted": False,
        "reason": "busy",
        "detail": "this device already takes part in run run-1",
    }
    assert invite(ctx)["accepted"] is True  # the same run again: idempotent

    assert supervisor.handle_fl_stop({"run_id": "run-1"}, ctx) == {"stopped": True, "reason": ""}
    assert not group_alive(pgid)
    assert wait_for(lambda: ctx.events[-1][1]["state"] == "stopped")
    assert ctx.events[-1][1]["reason"] == "fl_stop"
    assert not (ctx.paths.root / "federated" / "supernode.json").exists()


def test_supernode_is_stopped_after_the_timeout(ctx) -> None:
    ctx.config.fl_timeout_s = 1.0
    assert invite(ctx)["accepted"] is True
    pgid = supervisor.current(ctx.paths).proc.pid
    assert wait_for(lambda: any(e[1].get("reason") == "timeout" for e in ctx.events))
    assert not group_alive(pgid)


def test_invitations_that_cannot_be_honoured_are_declined(ctx, tmp_path) -> None:
    assert invite(ctx, base_sha256="a" * 64)["reason"] == "base-mismatch"
    assert invite(ctx, superlink="no port")["reason"] == "bad-request"
    assert invite(ctx, run_id="../etc")["reason"] == "bad-request"
    assert supervisor.handle_fl_invite("not a dict", ctx)["reason"] == "bad-request"  # type: ignore[arg-type]
    ctx.config.train_data = str(tmp_path / "private-notes-of-alice")
    reply = invite(ctx)
    assert reply["reason"] == "no-train-data" and "alice" not in json.dumps(reply)  # the reply goes to the server
    ctx.config.train_data = None
    assert invite(ctx)["reason"] == "no-train-data"
    ctx.config.profile = "esp32-s3-8mb"
    ctx.config.train_data = str(tmp_path)
    assert invite(ctx)["reason"] == "profile-cannot-train"
    assert supervisor.current(ctx.paths) is None and ctx.events == []


def test_an_orphaned_supernode_of_a_dead_agent_is_reaped(ctx) -> None:
    # a SuperNode started by an agent process that was then SIGKILLed
    code = (
        "import sys; from agent.config import AgentConfig, AgentPaths; from agent.federated import supervisor\n"
        "p = AgentPaths(sys.argv[1]); c = AgentConfig.load(p)\n"
        "n = supervisor.SuperNode(p, c, run_id='r', superlink=sys.argv[2], on_state=lambda *a, **k: None)\n"
        "n.start(); print(n.proc.pid, flush=True); import time; time.sleep(600)\n"
    )
    agent = subprocess.Popen(
        [sys.executable, "-c", code, str(ctx.paths.root), closed_port()],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    pgid = int(agent.stdout.readline())
    assert wait_for(lambda: supervisor._is_supernode(pgid))
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    assert group_alive(pgid)  # the agent died, its SuperNode did not
    assert supervisor.reap_stale(ctx.paths) is True
    assert wait_for(lambda: not supervisor._is_supernode(pgid), 10)
    assert not (ctx.paths.root / "federated" / "supernode.json").exists()


def test_the_daemon_dispatches_fl_invite_and_fl_stop(ctx) -> None:
    from agent.daemon import Daemon
    from edgellm.telemetry import Command

    daemon = Daemon(ctx.paths, ctx.config)
    events = []
    daemon._event = lambda kind, **f: events.append((kind, f))  # type: ignore[method-assign]
    payload = {
        "run_id": "run-9",
        "superlink": closed_port(),
        "base_version": "1.0.0",
        "base_sha256": sha256(ctx.paths.slot_dir("A") / "model.gguf"),
    }
    daemon._start_telemetry()  # registers the commands (telemetry itself is off in this config)
    commands = daemon.telemetry.commands
    invite = commands.run(Command(id="c1", name="fl_invite", args=payload))
    assert invite["ok"] and invite["result"] == {"accepted": True, "reason": ""}
    pgid = supervisor.current(ctx.paths).proc.pid
    stop = commands.run(Command(id="c2", name="fl_stop", args={"run_id": "run-9"}))
    assert stop["ok"] and stop["result"] == {"stopped": True, "reason": ""}
    assert not group_alive(pgid)
    assert wait_for(lambda: [e[1]["state"] for e in events] == ["started", "stopped"])

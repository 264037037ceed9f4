"""`edgellm quickstart` as a user runs it: a real process that trains, builds, starts Mosquitto, a
server and three agents, rolls out, fine-tunes and rolls out again — and leaves no process behind,
whether it ends, fails or is interrupted (SIGINT at several stages).

Processes are found the way a user would find strays: every process on the machine whose
environment carries this test's tag (each process the quickstart starts inherits its environment)
or whose command line names the work directory.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures_mqtt import MOSQUITTO
from waiting import wait_for

pytest.importorskip("flwr")
pytest.importorskip("torch")

TAG_ENV = "QUICKSTART_TEST_TAG"
#: the fastest settings that still run every stage for real
FAST = ("--steps", "40", "--distill-steps", "30", "--threads", "1", "--bake", "5s")
#: for interrupting: the model's quality does not matter
FASTEST = ("--steps", "5", "--distill-steps", "5", "--threads", "1", "--bake", "5s")


def needs_mosquitto() -> None:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")


def strays(tag: str, workdir: Path) -> list[str]:
    """Processes (other than this one) tagged by this test or naming ``workdir`` on their command line."""
    needle, where = f"{TAG_ENV}={tag}".encode(), str(workdir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in env or where in cmd:
            shown = cmd.replace(b"\0", b" ").decode(errors="replace")[:200]
            found.append(f"{entry.name}: {shown}")
    return found


class Quickstart:
    """`edgellm quickstart` as a real process, its output collected line by line."""

    def __init__(self, workdir: Path, *args: str, fast: tuple[str, ...] = FAST) -> None:
        self.workdir, self.tag, self.lines = workdir, secrets.token_hex(8), []
        env = {**os.environ, TAG_ENV: self.tag, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from edgellm.cli import main; main()",
                "quickstart",
                "--workdir",
                str(workdir),
                *fast,
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines[-80:])

    def stage_began(self, stage: str) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the quickstart ended before stage {stage}:\n{self.output()}")
        return any(f"stage {stage}:" in line for line in self.lines)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for line in strays(self.tag, self.workdir):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


@pytest.mark.slow
def test_quickstart_ends_with_three_devices_on_v2_and_lower_heldout_perplexity(tmp_path):
    needs_mosquitto()
    qs = Quickstart(tmp_path / "qs")
    try:
        rc = qs.wait(2400)
        assert rc == 0, qs.output()
        summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
        devices = summary["devices"]
        assert len(devices) == 3, devices
        assert {d["profile"] for d in devices} == {"rpi4-4gb", "rpi5-8gb", "x86-avx2-laptop-16gb"}
        assert all(d["version"] == "2.0.0" and d["online"] for d in devices), devices
        assert [(r["version"], r["state"]) for r in summary["rollouts"]] == [
            ("1.0.0", "completed"),
            ("2.0.0", "completed"),
        ]
        assert summary["federated"]["state"] == "published", summary["federated"]
        ppl = summary["federated"]["heldout_perplexity"]
        assert set(ppl) == {d["id"] for d in devices}
        for device, p in ppl.items():
            assert p["after"] < p["before"], (device, ppl)
        assert summary["request"]["answer"], summary["request"]
        assert summary["dashboard"].startswith("http://127.0.0.1:")
        out = qs.output()
        for stage in (
            "train",
            "distill",
            "build",
            "server",
            "broker",
            "fleet",
            "rollout-v1",
            "request",
            "federated",
            "rollout-v2",
            "summary",
        ):
            assert any(f"stage {stage}:" in line for line in qs.lines), (stage, out)
        assert "held-out ppl" in out
    finally:
        qs.kill()
    wait_for(lambda: not strays(qs.tag, tmp_path / "qs"), 30, "no process left after the quickstart")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["distill", "fleet", "federated"])
def test_sigint_at_any_stage_leaves_no_process_running(tmp_path, stage):
    needs_mosquitto()
    qs = Quickstart(tmp_path / "qs", fast=FASTEST)
    try:
        wait_for(lambda: qs.stage_began(stage), 1800, f"stage {stage} to begin", every=0.2)
        if stage == "fleet":  # let the stage start its processes: server, SuperLink, agents
            wait_for(lambda: len(strays(qs.tag, qs.workdir)) >= 4, 120, "processes to start", every=0.2)
        if stage == "federated":  # the devices' SuperNodes are up
            wait_for(lambda: any("supernode" in p for p in strays(qs.tag, qs.workdir)), 300, "a SuperNode", every=0.2)
        time.sleep(2)
        assert strays(qs.tag, qs.workdir), "nothing was running to interrupt"
        qs.proc.send_signal(signal.SIGINT)
        rc = qs.wait(120)
        assert rc == 130, qs.output()
        assert "every process it started is stopped" in qs.output()
        left = strays(qs.tag, qs.workdir)
        assert not left, "\n".join(left)
    finally:
        qs.kill()


def test_quickstart_refuses_a_non_empty_directory_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    r = subprocess.run(
        [sys.executable, "-c", "from edgellm.cli import main; main()", "quickstart", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert "is not a quickstart work directory" in r.stderr and "--workdir" in r.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_unknown_stop_after_stage_is_refused_before_anything_runs(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from edgellm.cli import main; main()",
            "quickstart",
            "--workdir",
            str(tmp_path / "qs"),
            "--stop-after",
            "nope",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "unknown stage 'nope'" in r.stderr, r.stderr
    assert not (tmp_path / "qs").exists()

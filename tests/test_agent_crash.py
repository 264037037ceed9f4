"""kill -9 at random instants of an install: every restart comes up on a complete, verified slot.

Each trial runs only the install path (`edgellm-agent install`, a real process with its real
child-process health check on a real model) and SIGKILLs its whole process group at a random
instant; then it does what a restarting daemon does (``SlotStore.boot`` under the install lock)
and checks the current slot byte for byte against what was verified.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_agent import AgentProcess, agent_cli, provision_agent

pytestmark = pytest.mark.slow

TRIALS = 24


def _health_children(data_dir: Path) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"agent.health" in cmd and str(data_dir).encode() in cmd:
                pids.append(int(p.name))
    return pids


def test_kill_9_at_random_points_of_an_install(tmp_path, agent_bundles):
    from agent._fs import file_lock
    from agent.config import AgentPaths
    from agent.slots import SlotStore

    d = provision_agent(tmp_path / "agent", agent_bundles["root"])
    paths = AgentPaths(d)
    store = SlotStore(paths)
    envelopes = {"1.0.0": agent_bundles["v1"], "1.1.0": agent_bundles["v2"]}
    agent_cli("install", str(envelopes["1.0.0"]), data_dir=d)
    t0 = time.monotonic()
    agent_cli("install", str(envelopes["1.1.0"]), data_dir=d)
    full = time.monotonic() - t0

    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "agent.cli", "--help"], capture_output=True, check=True)
    startup = time.monotonic() - t0  # kills before this only hit interpreter start-up
    rng = random.Random(20261129)
    delays = [startup + (full - startup) * 1.2 * (i + rng.random()) / TRIALS for i in range(TRIALS)]
    rng.shuffle(delays)
    interrupted = completed = 0
    for delay in delays:
        before = store.load().current_record.version
        target = "1.0.0" if before == "1.1.0" else "1.1.0"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "install",
                "--data-dir",
                str(d),
                "--allow-downgrade",
                "--force",
                str(envelopes[target]),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(delay)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        # the health check child never outlives the killed install
        deadline = time.monotonic() + 5
        while _health_children(d) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _health_children(d) == []
        # restart: what the daemon does first
        with file_lock(paths.lock, timeout=10):
            state = store.boot(max_boots=3)
        assert state.current in ("A", "B")
        manifest = store.verify(state, state.current, deep=True)  # complete and matching what was verified
        assert manifest.version == state.current_record.version in envelopes
        assert not paths.staging.exists()
        if state.current_record.version == before:
            interrupted += 1
        else:
            completed += 1
    assert interrupted >= 1
    # leftovers of killed installs never break the next one, and the agent serves from the slot
    state = store.load()
    other = "1.0.0" if state.current_record.version == "1.1.0" else "1.1.0"
    agent_cli("install", "--allow-downgrade", "--force", str(envelopes[other]), data_dir=d)
    assert store.load().current_record.version == other
    with AgentProcess(d) as a:
        import httpx

        r = httpx.post(
            a.base_url + "/v1/completions",
            headers=a.headers,
            json={"model": "tiny", "prompt": "The robot", "max_tokens": 4},
        )
        assert r.status_code == 200 and r.json()["system_fingerprint"] == f"edgellm-{other}"
    print(f"{TRIALS} kill -9 trials: {interrupted} interrupted, {completed} completed; full install {full:.2f} s")


@pytest.mark.parametrize("point", ["forgotten", "unpacked", "renamed", "health_child", "health_checked", "switched"])
def test_kill_9_at_each_step_of_an_install(tmp_path, agent_bundles, point):
    from agent._fs import file_lock
    from agent.config import AgentPaths
    from agent.slots import SlotStore

    d = provision_agent(tmp_path / "agent", agent_bundles["root"])
    paths, store = AgentPaths(d), SlotStore(AgentPaths(d))
    agent_cli("install", str(agent_bundles["v1"]), data_dir=d)
    r = agent_cli("install", str(agent_bundles["v2"]), data_dir=d, check=False, env={"EDGELLM_AGENT_CRASH_AT": point})
    assert r.returncode == -signal.SIGKILL
    time.sleep(0.2)
    assert _health_children(d) == []
    with file_lock(paths.lock, timeout=10):
        state = store.boot(max_boots=3)
    store.verify(state, state.current, deep=True)
    expected = "1.1.0" if point == "switched" else "1.0.0"
    assert state.current_record.version == expected
    # and the interrupted install can simply be run again
    if expected == "1.0.0":
        agent_cli("install", str(agent_bundles["v2"]), data_dir=d)
        assert store.load().current_record.version == "1.1.0"


def test_a_trial_that_keeps_dying_reverts_by_itself(tmp_path, agent_bundles):
    import httpx

    from agent.config import AgentPaths
    from agent.slots import SlotStore

    d = provision_agent(tmp_path / "agent", agent_bundles["root"], trial_commit_s=1000.0, max_boot_attempts=2)
    store = SlotStore(AgentPaths(d))
    agent_cli("install", str(agent_bundles["v1"]), data_dir=d)
    store.commit_trial()  # 1.0.0 is the known-good slot
    agent_cli("install", str(agent_bundles["v2"]), data_dir=d)
    served = []
    for _start in range(3):
        a = AgentProcess(d)
        served.append(httpx.get(a.base_url + "/v1/models", headers=a.headers).json()["data"][0]["version"])
        os.killpg(a.proc.pid, signal.SIGKILL)  # the new model "crashes" the agent before the trial commits
        a.proc.wait()
        a.log.close()
    assert served == ["1.1.0", "1.1.0", "1.0.0"]
    st = store.load()
    assert st.current_record.version == "1.0.0" and st.trial is None
    assert st.last_result["action"] == "revert" and "1.1.0" in st.rejected

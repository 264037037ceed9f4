"""Fixtures for the device agent: signed bundles of a real tiny GGUF model, and agents.

agent_bundles    session: {"keys", "root", "repo", "v1", "v2", "bad_health", "tampered",
                 "foreign", "bundles": {version: bundle path}} — signed envelopes (``edgellm
                 repo export``) of the tiny Q8_0 GGUF (tests/fixtures_gguf.py) at versions
                 1.0.0 and 1.1.0, a 1.2.0 whose golden prompt cannot pass, a v2 envelope with
                 a flipped byte, and a v2 signed by keys the device does not trust
provisioned_agent  function: a provisioned data dir (profile rpi4-4gb), via the real CLI
AgentProcess     helper that runs `edgellm-agent run` as a real process and finds its port
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

AGENT_PROFILE = "rpi4-4gb"
MODEL_NAME = "tiny"
GOLDEN_PROMPT = "The robot"


def agent_cli(
    *args: str, data_dir: Path | None = None, check: bool = True, timeout: float = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `edgellm-agent ARGS` as a real process (``python -m agent.cli``)."""
    cmd = [sys.executable, "-m", "agent.cli", *args]
    if data_dir is not None:
        cmd[4:4] = ["--data-dir", str(data_dir)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def make_gguf_bundle(
    out_dir: Path,
    gguf: Path,
    *,
    version: str,
    golden: list[dict],
    health: dict | None = None,
    name: str = MODEL_NAME,
    extra: dict | None = None,
) -> Path:
    """Pack a bundle of ``gguf`` (a real model) at ``version``; returns the bundle archive."""
    from edgellm.bundle import pack

    src = out_dir / f"src-{version}"
    src.mkdir(parents=True)
    shutil.copyfile(gguf, src / "model.gguf")
    (src / "manifest.json").write_text(
        json.dumps(
            {
                "name": name,
                "version": version,
                "runtime": "gguf",
                "artifact": "model.gguf",
                "quantization": "q8_0",
                "profiles": [AGENT_PROFILE],
                "memory": {"context_length": 256},
                "generation": {"temperature": 0.0},
                "golden_prompts": golden,
                "health": health or {},
                **(extra or {}),
            }
        )
    )
    return pack(src, out_dir / f"{name}-{version}.bundle").path


def _flip_inside_target(envelope: Path, out: Path) -> Path:
    data = bytearray(envelope.read_bytes())
    i = data.find(b"GGUF")
    assert i > 0
    data[i + 4096] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="session")
def agent_onnx_bundle(tmp_path_factory, onnx_int8_path) -> dict:
    """A signed envelope of the int8 ONNX export of the tiny model (its own keys and repository)."""
    from edgellm.bundle import pack
    from edgellm.trust import Repository, init_keys

    d = tmp_path_factory.mktemp("agent-onnx")
    src = d / "src"
    src.mkdir()
    shutil.copyfile(onnx_int8_path, src / "model.onnx")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(onnx_int8_path.parent / name, src / name)
    (src / "manifest.json").write_text(
        json.dumps(
            {
                "name": "tiny-onnx",
                "version": "2.0.0",
                "runtime": "onnx",
                "artifact": "model.onnx",
                "tokenizer": "tokenizer.json",
                "quantization": "int8",
                "profiles": [AGENT_PROFILE],
                "memory": {"context_length": 256},
                "golden_prompts": [
                    {"prompt": "The robot", "max_tokens": 8},
                    {"prompt": "Hello", "max_tokens": 4, "chat": True},
                ],
            }
        )
    )
    bundle = pack(src, d / "tiny-onnx-2.0.0.bundle").path
    root = init_keys(d / "keys")
    repo = Repository.create(d / "repo", d / "keys")
    return {"root": root, "envelope": repo.export_signed(repo.add_bundle(bundle), d / "tiny-onnx-2.0.0.signed")}


@pytest.fixture(scope="session")
def agent_bundles(tmp_path_factory, tiny_gguf) -> dict:
    from edgellm.runtime import GenerationParams
    from edgellm.runtime.llamacpp import LlamaCppRuntime
    from edgellm.trust import Repository, init_keys

    d = tmp_path_factory.mktemp("agent-bundles")
    # the golden output of the real model, so the health check's expectation is meaningful
    with LlamaCppRuntime.load(tiny_gguf, threads=1, context_length=256) as rt:
        text = rt.complete(rt.tokenize(GOLDEN_PROMPT), GenerationParams(max_tokens=8)).text
    expect = text.strip().split()[0] if text.strip() else None
    good = [
        {"prompt": GOLDEN_PROMPT, "max_tokens": 8, "expect": expect},
        {"prompt": "Hello", "max_tokens": 4, "chat": True},
    ]
    bundles = {
        "1.0.0": make_gguf_bundle(d, tiny_gguf, version="1.0.0", golden=good),
        "1.1.0": make_gguf_bundle(d, tiny_gguf, version="1.1.0", golden=good),
        "1.2.0": make_gguf_bundle(
            d,
            tiny_gguf,
            version="1.2.0",
            golden=[{"prompt": GOLDEN_PROMPT, "max_tokens": 4, "expect": "never-said-xyz"}],
        ),
    }
    root = init_keys(d / "keys")
    repo = Repository.create(d / "repo", d / "keys")
    names = {v: repo.add_bundle(p) for v, p in bundles.items()}
    out = {
        "keys": d / "keys",
        "root": root,
        "repo": repo,
        "repo_dir": d / "repo",
        "bundles": bundles,
        "names": names,
        "golden_expect": expect,
    }
    for key, v in (("v1", "1.0.0"), ("v2", "1.1.0"), ("bad_health", "1.2.0")):
        out[key] = repo.export_signed(names[v], d / f"{MODEL_NAME}-{v}.signed")
    out["tampered"] = _flip_inside_target(out["v2"], d / "tampered.signed")
    # the same bundle, signed by a fleet this device does not trust
    init_keys(d / "other-keys")
    other = Repository.create(d / "other-repo", d / "other-keys")
    out["foreign"] = other.export_signed(other.add_bundle(bundles["1.1.0"]), d / "foreign.signed")
    return out


def provision_agent(
    data_dir: Path,
    root: Path,
    *,
    server: str | None = None,
    limits: dict | None = None,
    args: tuple[str, ...] = (),
    **config: object,
) -> Path:
    """Provision through the real CLI, then shorten the trial and tune limits for tests."""
    args = ("provision", "--device-id", "dev-1", "--profile", AGENT_PROFILE, "--root", str(root), *args)
    if server:
        args += ("--server", server)
    agent_cli(*args, data_dir=data_dir)
    cfg_path = data_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["limits"].update(limits or {})
    cfg.update({"trial_commit_s": 2.0, "health_timeout_s": 120, **config})
    cfg_path.write_text(json.dumps(cfg))
    return data_dir


@pytest.fixture
def provisioned_agent(tmp_path, agent_bundles) -> Path:
    return provision_agent(tmp_path / "agent", agent_bundles["root"])


@pytest.fixture
def tuf_server(agent_bundles):
    """The signed repository of ``agent_bundles`` served over HTTP ({url}/metadata/, {url}/targets/)."""
    with serve_directory(agent_bundles["repo_dir"]) as url:
        yield url


@contextlib.contextmanager
def serve_directory(directory: Path):
    """A directory (a TUF repository) over HTTP on a free loopback port; yields its URL."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)


class AgentProcess:
    """`edgellm-agent run` as a real process; stop() sends SIGTERM and waits."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        run_info = data_dir / "run" / "agent.json"
        run_info.unlink(missing_ok=True)
        self.log = open(data_dir / "agent-test.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while not run_info.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("agent did not start:\n" + self.logs())
            time.sleep(0.05)
        self.info = json.loads(run_info.read_text())
        self.port = self.info["port"]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.token = (data_dir / "api-token").read_text().strip()
        self.headers = {"Authorization": f"Bearer {self.token}"}
        self.admin_headers = {"Authorization": f"Bearer {(data_dir / 'admin-token').read_text().strip()}"}
        self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base_url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("agent not ready:\n" + self.logs())

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def logs(self) -> str:
        self.log.flush()
        return (self.data_dir / "agent-test.log").read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 20, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Federated fine-tuning with nothing emulated: Mosquitto, `edgellm-server run --fl` (its SuperLink),
three `edgellm-agent run` processes (each supervising a real `flower-supernode`) holding different
local text, and the operator's `edgellm-server fl start ... --wait`.

Checked: the run publishes; every device's held-out local text has a lower perplexity on the
published GGUF than on the base, measured through llama.cpp; the new version is a TUF target with
its lineage; the canary rollout brings it to every device. And privacy: every request the devices
make to the SuperLink goes through a recording proxy (the server advertises it with
``--fl-advertise``), and what they push decodes to adapter tensors, metrics and a device record
only; a line that exists only in one device's training data is nowhere in the server's data dir,
its log, the SuperLink's state, the broker's persistence, any MQTT message or anything the devices
sent to the SuperLink.

A device killed mid-round is tested in ``test_federated_e2e.py``.
"""

from __future__ import annotations

import http.server
import json
import math
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fixtures_agent import AgentProcess, agent_cli, make_gguf_bundle, provision_agent
from fixtures_mqtt import free_port, raw_client
from waiting import stop_group, wait_for

pytest.importorskip("flwr")
pytest.importorskip("torch")

pytestmark = pytest.mark.slow

GROUP, BASE, NEW = "lab", "1.0.0", "1.1.0"
ROUNDS = 2
BIN = Path(sys.executable).parent

#: each device's own regular text (learnable in a few steps), one document per line
TEMPLATES = {
    "dev-0": ("The {c} lamp in room {a} blinks {b} times.", ["red", "green", "amber", "white"]),
    "dev-1": ("Valve {c} on line {a} opens at {b} bar.", ["north", "south", "east", "west"]),
    "dev-2": ("Order {c} ships from dock {a} in {b} days.", ["alpha", "bravo", "delta", "kilo"]),
}


def local_text(device: str, n: int = 120) -> list[str]:
    tpl, words = TEMPLATES[device]
    return [tpl.format(c=words[i % 4], a=i % 5 + 1, b=i % 3 + 2) for i in range(n)]


# -- a recording reverse proxy in front of the SuperLink -------------------------------------------


class RecordingProxy:
    """Forwards every request to ``upstream`` and records (method, path, request body)."""

    def __init__(self, upstream: str) -> None:
        self.records: list[tuple[str, str, bytes]] = []
        lock = threading.Lock()
        client = httpx.Client(base_url=f"http://{upstream}", timeout=120.0, trust_env=False)
        records = self.records

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    records.append((self.command, self.path, body))
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")
                }
                try:
                    r = client.request(self.command, self.path, content=body, headers=headers)
                except httpx.HTTPError:
                    self.send_error(502)
                    return
                data = r.content
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET = _forward

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def pushed_contents(records: list[tuple[str, str, bytes]]) -> list[object]:
    """The RecordDicts the devices pushed (their replies' content), decoded with Flower's own code."""
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.supercore.inflatable.inflatable_object import get_object_type_from_object_content
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objects: dict[str, bytes] = {}
    for _, path, body in records:
        if path.endswith("/push-object"):
            req = PushObjectRequest.FromString(body)
            objects[req.object_id] = req.object_content
    types = {get_object_type_from_object_content(c) for c in objects.values()}
    assert types <= {"Message", "RecordDict", "ArrayRecord", "Array", "ArrayChunk", "MetricRecord", "ConfigRecord"}, (
        types
    )
    return [
        inflate_object_from_contents(oid, objects, keep_object_contents=True)
        for oid, c in objects.items()
        if get_object_type_from_object_content(c) == "RecordDict"
    ]


def write_local_text(data: Path, device: str, marker: str | None = None) -> list[str]:
    """The device's text as `--train-data` holds it (documents separated by blank lines); returns
    its held-out part, as the device splits it. A marker line goes to the part it trains on."""
    from edgellm.pipeline.data import load_dataset

    data.mkdir(exist_ok=True)
    while True:
        (data / "notes.txt").write_text("\n\n".join(local_text(device) + ([marker] if marker else [])) + "\n")
        ds = load_dataset([data], val_fraction=0.2)
        if marker is None or any(marker in d for d in ds.train):
            return ds.val
        marker = f"{marker}!"  # another hash, another side of the split


# -- processes -------------------------------------------------------------------------------------


def server_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def tail(path: Path, n: int = 40) -> str:
    try:
        return f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"--- {path}: none"


def all_logs(tmp: Path) -> str:
    paths = [tmp / "server.log", tmp / "srv" / "flwr" / "superlink.log"]
    for d in sorted(tmp.glob("agent-*")):
        paths += [d / "agent-test.log", d / "federated" / "supernode.log"]
    return "\n".join(tail(p) for p in paths)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def agent_status(a: AgentProcess) -> dict:
    return httpx.get(a.base_url + "/v1/admin/status", headers=a.admin_headers, timeout=10).json()


def the_rollout_reaches_every_agent(agents: list[AgentProcess], srv_dir: Path, rollout_id: str) -> None:
    """The canary rollout `fl start` began (--canary 34% --bake 1s, no gate) completes: every agent
    serves the new version (each agent installs its signed assignment): the merged bundle, or, on
    the base artifact the run's adapter was built for, the base with the `federated` adapter."""
    assert rollout_id, "fl start started no rollout"

    def on_new(a: AgentProcess) -> bool:
        s = agent_status(a)
        serving = {(x["name"], x["version"]) for x in s["adapters"]["installed"] if x["serving"]}
        return s.get("version") == NEW or (s.get("version") == BASE and ("federated", NEW) in serving)

    wait_for(lambda: all(on_new(a) for a in agents), 300, "every agent on the new version", every=1.0)

    def row() -> dict:
        r = server_cli("rollout", "status", "--data-dir", str(srv_dir), rollout_id, "--format", "json")
        rows = json.loads(r.stdout)
        return rows[0] if isinstance(rows, list) else rows

    wait_for(lambda: row()["state"] == "completed", 60, "the rollout completed", every=1.0)
    assert row()["version"] == NEW and row()["on_new_version"] == len(agents)


def llama_perplexity(gguf: Path, texts: list[str]) -> float:
    """Perplexity of ``texts`` (one document each) under ``gguf``, through llama.cpp."""
    import numpy as np

    from edgellm.pipeline.evaluate import compare_logits
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    nll = tokens = 0.0
    with LlamaCppRuntime.load(gguf, threads=1, context_length=256) as rt:
        for t in texts:
            ids = rt.tokenize(t)
            m = compare_logits(rt.logits(ids)[:-1], np.asarray(ids[1:]))
            nll += m["nll"] * m["eval_tokens"]
            tokens += m["eval_tokens"]
    return math.exp(nll / tokens)


def files_containing(roots: list[Path], needle: bytes) -> list[str]:
    hits = []
    for root in roots:
        for p in [root] if root.is_file() else root.rglob("*"):
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(str(p))
    return hits


# -- the test ----------------------------------------------------------------------------------------


def test_three_real_agents_fine_tune_publish_and_receive_the_new_version(tmp_path, tiny_gguf, mqtt_broker):
    from edgellm.bundle import unpack
    from edgellm.pipeline.gguf_load import _reader, gguf_config
    from edgellm.pipeline.lora import LoraConfig, expected_shapes
    from edgellm.trust import Repository

    t0 = time.monotonic()
    marker = f"ZEBRA-{secrets.token_hex(8)} lives only on dev-0"
    srv_dir = tmp_path / "srv"
    server_cli("init", "--data-dir", str(srv_dir))
    bundle = make_gguf_bundle(
        tmp_path / "bundles", tiny_gguf, version=BASE, golden=[{"prompt": "The robot", "max_tokens": 8}]
    )
    server_cli("publish", "--data-dir", str(srv_dir), str(bundle))
    repo = Repository(srv_dir / "repo", srv_dir / "keys")
    base_target = next(t.name for t in repo.list_targets() if t.custom["edgellm"]["version"] == BASE)
    envelope = repo.export_signed(base_target, tmp_path / "base.signed")

    http_port, link_port = free_port(), free_port()
    proxy = RecordingProxy(f"127.0.0.1:{link_port}")
    log = open(tmp_path / "server.log", "wb")
    srv = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "run",
            "--data-dir",
            str(srv_dir),
            "--mqtt",
            mqtt_broker.url,
            "--http",
            f"127.0.0.1:{http_port}",
            "--tick",
            "0.2",
            "--min-samples",
            "1",
            "--fl",
            f"127.0.0.1:{link_port}",
            "--fl-advertise",
            proxy.address,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server_url = f"http://127.0.0.1:{http_port}"
    agents: list[AgentProcess] = []
    heldout: dict[str, list[str]] = {}
    mqtt_seen: list[bytes] = []  # every MQTT message of the test, as an eavesdropper on '#' sees it
    spy = raw_client(mqtt_broker.url, "test-spy")
    spy.on_message = lambda _c, _u, m: mqtt_seen.append(bytes(m.payload))
    spy.subscribe("#")
    try:
        for i, device in enumerate(TEMPLATES):
            data = tmp_path / f"text-{i}"
            heldout[device] = write_local_text(data, device, marker if device == "dev-0" else None)
            d = provision_agent(
                tmp_path / f"agent-{i}",
                srv_dir / "keys" / "root.json",
                server=server_url,
                args=("--device-id", device, "--mqtt", mqtt_broker.url, "--group", GROUP, "--train-data", str(data)),
            )
            agent_cli("install", str(envelope), data_dir=d)
            agents.append(AgentProcess(d))
        wait_for(lambda: _ok(server_url + "/healthz"), 60, "server up")

        def online() -> bool:
            r = server_cli("devices", "--data-dir", str(srv_dir), "--group", GROUP, "--format", "json")
            devs = json.loads(r.stdout)
            return sum(1 for x in devs if x.get("online") and x.get("version") == BASE) == 3

        wait_for(online, 90, "three devices online on the base version", every=1.0)
        fl = subprocess.run(
            [
                "timeout",
                "1200",
                sys.executable,
                "-m",
                "server.cli",
                "fl",
                "start",
                "--data-dir",
                str(srv_dir),
                "--model",
                "tiny",
                "--version",
                BASE,
                "--group",
                GROUP,
                "--rounds",
                str(ROUNDS),
                "--min-devices",
                "3",
                "--publish",
                NEW,
                "--local-steps",
                "12",
                "--lr",
                "3e-3",
                "--lora-rank",
                "4",
                "--lora-alpha",
                "8",
                "--canary",
                "34%",
                "--bake",
                "1s",
                "--no-gate",
                "--invite-timeout",
                "2m",
                "--round-timeout",
                "10m",
                "--wait",
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=1260,
        )
        assert fl.returncode == 0, fl.stdout[-3000:] + fl.stderr[-2000:] + all_logs(tmp_path)
        run = json.loads(fl.stdout)[0]
        assert run["state"] == "published", run
        st = json.loads(server_cli("fl", "status", "--data-dir", str(srv_dir), run["id"], "--format", "json").stdout)[0]
        assert sorted(d["device"] for d in st["participating"]) == sorted(TEMPLATES), st
        assert [rd["round"] for rd in st["rounds_detail"]] == list(range(1, ROUNDS + 1))
        for rd in st["rounds_detail"]:
            assert rd["replies"] == 3 and rd["rejected"] == 0, st
            assert rd["heldout_after"] < rd["heldout_before"] and rd["train_loss"] > 0, rd
        globals_ = [rd["heldout_global"] for rd in st["rounds_detail"]]
        assert globals_ == sorted(globals_, reverse=True), globals_
        # each agent's SuperNode ran the rounds and was stopped when the run left `running`
        wait_for(
            lambda: not any((a.data_dir / "federated" / "supernode.json").exists() for a in agents),
            60,
            "the SuperNodes stopped",
            every=0.5,
        )
        for a in agents:
            assert "Receiving: train message" in (a.data_dir / "federated" / "supernode.log").read_text()

        # the new version, with its lineage, in the TUF repository
        new = [
            t
            for t in Repository(srv_dir / "repo").list_targets()
            if t.custom["edgellm"]["version"] == NEW and t.custom["edgellm"].get("kind") != "adapter"
        ]  # the merged full bundle (the run's adapter bundles are beside it)
        assert new, "no target of the new version"
        lineage = new[0].custom["edgellm"]["federated"]
        assert (lineage["run"], lineage["base_version"], lineage["rounds"], lineage["devices"]) == (
            run["id"],
            BASE,
            ROUNDS,
            3,
        )
        from agent.config import AgentConfig, AgentPaths
        from agent.federated.device import local_data

        for a in agents:
            paths = AgentPaths(a.data_dir)
            cfg = AgentConfig.load(paths)
            assert lineage["device_data_sha256"][cfg.device_id] == local_data(paths, cfg).sha256

        the_rollout_reaches_every_agent(agents, srv_dir, st["rollout"])

        # held-out perplexity, through llama.cpp, on the published GGUF against the base
        manifest = unpack(Repository(srv_dir / "repo").target_path(new[0].name), tmp_path / "v2")
        v2 = tmp_path / "v2" / manifest.artifact
        measured = {
            dev: (llama_perplexity(tiny_gguf, texts), llama_perplexity(v2, texts)) for dev, texts in heldout.items()
        }
        print(
            f"\nfleet e2e: {ROUNDS} rounds, 3 devices, {manifest.quantization} {v2.stat().st_size} B, "
            f"wall {time.monotonic() - t0:.0f}s; global held-out loss per round "
            f"{[round(x, 3) for x in globals_]}; held-out perplexity base -> {NEW}: "
            + ", ".join(f"{d} {b:.2f} -> {n:.2f}" for d, (b, n) in measured.items())
        )
        for dev, (before, after) in measured.items():
            assert after < before, (dev, measured)

        # what the devices sent: adapter tensors, metrics and a device record, nothing else
        shapes = expected_shapes(gguf_config(_reader(tiny_gguf)), LoraConfig(rank=4, alpha=8.0))
        paths_seen = {p for _, p, _ in proxy.records}
        assert any(p.endswith("/push-object") for p in paths_seen), paths_seen
        replies = pushed_contents(proxy.records)
        train = [c for c in replies if "arrays" in c]
        assert len(train) == 3 * ROUNDS and len(replies) == 2 * 3 * ROUNDS, [list(c) for c in replies]
        for c in replies:
            assert set(c) <= {"arrays", "metrics", "device"}, list(c)
            assert set(c["device"]) == {"device-id", "data-sha256", "decline-reason"}
            assert c["device"]["decline-reason"] == ""
            assert set(c["metrics"]) <= {
                "num-examples",
                "train-loss",
                "heldout-loss-before",
                "heldout-loss-after",
                "heldout-loss",
            }
        for c in train:
            assert {k: tuple(v.shape) for k, v in c["arrays"].items()} == shapes
    except BaseException:
        print(all_logs(tmp_path))
        raise
    finally:
        for a in agents:
            a.stop()
        stop_group(srv, 30)
        log.close()
        proxy.close()
        spy.loop_stop()
        spy.disconnect()
        mqtt_broker.stop()  # mosquitto writes its persistence file on exit

    # a line that exists only in dev-0's training data is nowhere on the server side
    needle = marker.encode()
    sent = [p for _, p, body in proxy.records if needle in body]
    assert not sent, f"the marker went over the Fleet API in {sent}"
    assert mqtt_seen and not [m for m in mqtt_seen if needle in m], "the marker went over MQTT"
    leaks = files_containing([srv_dir, tmp_path / "server.log", mqtt_broker.workdir], needle)
    assert not leaks, leaks
    assert files_containing([tmp_path / "text-0"], needle)  # the search does find it where it is

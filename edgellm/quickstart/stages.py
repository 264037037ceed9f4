"""The quickstart's stages, each a function of one :class:`Run`, driving the real commands.

Every command runs as its own process, as an operator would type it (``edgellm``,
``edgellm-server``, ``edgellm-agent``); :class:`~edgellm.quickstart.procs.ProcessRegistry` owns them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgellm._fs import atomic_write
from edgellm.durations import parse_seconds
from edgellm.quickstart.fleet import DEVICES, fleet_table, perplexity, target_artifact, write_local_text
from edgellm.quickstart.procs import ProcessRegistry, StepFailed

MODEL, V1, V2, GROUP = "quickstart", "1.0.0", "2.0.0", "demo"
#: the teacher: the tiny preset, twice as deep (the student is the tiny preset itself)
TEACHER_CONFIG = {
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
GATE = "error_rate<=0.05,p95_latency_ms<=5000"
PROMPT = "turn on the kitchen light"
#: agents report inference metrics once a minute: a canary's gate is judged on them, so a short
#: bake keeps baking (up to --max-bake-factor) until a report has arrived
AGENT_METRICS_S = 60.0
MOSQUITTO_HINT = (
    "install Mosquitto (Debian/Ubuntu: sudo apt-get install -y mosquitto; macOS: brew install "
    "mosquitto) and run the quickstart again; it starts its own broker on a free local port"
)


@dataclasses.dataclass
class Options:
    workdir: Path
    steps: int = 300
    distill_steps: int = 200
    fl_rounds: int = 1
    fl_local_steps: int = 12
    bake: str = "30s"
    min_samples: int = 5
    threads: int = 2


def edgellm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from edgellm.cli import main; main()", *args]


def server_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", *args]


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], Any], timeout: float, what: str, every: float = 1.0, hint: str | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise StepFailed(f"timed out after {timeout:.0f}s waiting for {what}", hint=hint)


@dataclasses.dataclass
class Run:
    """What the stages share: options, paths, processes, what each stage learnt."""

    opts: Options
    procs: ProcessRegistry
    say: Callable[[str], None]
    ports: dict[str, int] = dataclasses.field(default_factory=dict)
    agents: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    heldout: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    rollouts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    federated: dict[str, Any] = dataclasses.field(default_factory=dict)
    answer: str = ""

    def path(self, *parts: str) -> Path:
        return self.opts.workdir.joinpath(*parts)

    @property
    def srv(self) -> Path:
        return self.path("server")

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.ports['mqtt']}"

    def server_json(self, *args: str) -> Any:
        return json.loads(self.procs.run("edgellm-server", server_cmd(*args, "--format", "json"), timeout=300))

    def devices(self) -> list[dict[str, Any]]:
        return list(self.server_json("devices", "--data-dir", str(self.srv), "--group", GROUP))


# -- model ---------------------------------------------------------------------------------------


def train(run: Run) -> None:
    cfg = run.path("models", "teacher-config.json")
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps(TEACHER_CONFIG, indent=2))
    run.procs.run(
        "train",
        edgellm_cmd(
            "train",
            "--data",
            "builtin:devices",
            "--config",
            str(cfg),
            "--out",
            str(run.path("models", "teacher")),
            "--steps",
            str(run.opts.steps),
            "--eval-every",
            str(max(run.opts.steps // 2, 1)),
            "--threads",
            str(run.opts.threads),
            "--overwrite",
        ),
    )
    report = json.loads(run.path("models", "teacher", "train_report.json").read_text())
    run.say(f"teacher: {report['params']:,} parameters, validation perplexity {report['val_ppl']:.2f}")


def distill(run: Run) -> None:
    out = run.procs.run(
        "distill",
        edgellm_cmd(
            "distill",
            "--teacher",
            str(run.path("models", "teacher")),
            "--data",
            "builtin:devices",
            "--student-config",
            "tiny",
            "--out",
            str(run.path("models", "student")),
            "--steps",
            str(run.opts.distill_steps),
            "--eval-every",
            str(max(run.opts.distill_steps // 2, 1)),
            "--threads",
            str(run.opts.threads),
            "--overwrite",
        ),
    )
    r = json.loads(out)
    run.say(
        f"student: {r['student_params']:,} parameters ({r['param_ratio']:.0%} of the teacher), validation "
        f"perplexity {r['student_val_ppl']:.2f}, top-1 agreement with the teacher {r['top1_agreement']:.0%}"
    )


def build(run: Run) -> None:
    # GGUF F16 for every profile: devices fine-tune the GGUF they serve, and a federated run trains one
    # artifact (a device on another one is excluded as base-mismatch)
    args = [
        "build",
        "--model",
        str(run.path("models", "student")),
        "--out",
        str(run.path("dist")),
        "--name",
        MODEL,
        "--version",
        V1,
        "--candidates",
        "gguf-f16",
        "--cache-dir",
        str(run.path("cache")),
        "--format",
        "json",
    ]
    for profile, _tpl, _words in DEVICES.values():
        args += ["--profile", profile]
    report = json.loads(run.procs.run("build", edgellm_cmd(*args)))
    for r in report.get("profiles", report.get("results", [])):
        if isinstance(r, dict):
            run.say(f"{r.get('profile')}: {r.get('chosen') or r.get('refusal')}")


def server(run: Run) -> None:
    run.procs.run(
        "server-init", server_cmd("init", "--data-dir", str(run.srv), "--root-keys-out", str(run.path("root-keys")))
    )
    bundles = sorted(str(p) for p in run.path("dist").glob("*.bundle"))
    if len(bundles) != len(DEVICES):
        raise StepFailed(
            f"expected {len(DEVICES)} bundles in {run.path('dist')}, found {len(bundles)}",
            hint=f"see {run.path('dist', 'report.md')}",
        )
    run.procs.run("publish", server_cmd("publish", "--data-dir", str(run.srv), *bundles))
    run.say(
        f"server {run.srv} initialised; {len(bundles)} bundles of {MODEL} {V1} signed and published "
        f"(root key kept apart in {run.path('root-keys')})"
    )


# -- processes -----------------------------------------------------------------------------------


def broker(run: Run) -> None:
    exe = shutil.which("mosquitto") or next(
        (
            p
            for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")
            if Path(p).exists()
        ),
        None,
    )
    if exe is None:
        raise StepFailed(
            "no MQTT 5 broker: Mosquitto is not installed (the device telemetry needs MQTT 5 "
            "sessions, which no pip-installable broker provides)",
            hint=MOSQUITTO_HINT,
        )
    d = run.path("broker")
    d.mkdir(parents=True, exist_ok=True)
    run.ports["mqtt"] = free_port()
    (d / "mosquitto.conf").write_text(
        "\n".join(
            [
                f"listener {run.ports['mqtt']} 127.0.0.1",
                "allow_anonymous true",
                "persistence true",
                f"persistence_location {d}/",
                "max_queued_messages 100000",
                f"log_dest file {d}/mosquitto.log",
                "",
            ]
        )
    )
    proc = run.procs.start("mosquitto", [exe, "-c", str(d / "mosquitto.conf")])
    wait_until(lambda: proc.poll() is not None or _port_open(run.ports["mqtt"]), 20, "the broker", every=0.1)
    if proc.poll() is not None:
        raise StepFailed(
            f"mosquitto exited ({proc.returncode})",
            log=run.procs.log_path("mosquitto"),
            hint=f"see {d / 'mosquitto.log'}",
        )
    run.say(f"Mosquitto on {run.mqtt_url}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def fleet(run: Run) -> None:
    """`edgellm-server run --fl`, then three agents joined to it, each with its own text."""
    run.ports["http"], run.ports["fl"] = free_port(), free_port()
    srv = run.procs.start(
        "server",
        server_cmd(
            "run",
            "--data-dir",
            str(run.srv),
            "--mqtt",
            run.mqtt_url,
            "--http",
            f"127.0.0.1:{run.ports['http']}",
            "--fl",
            f"127.0.0.1:{run.ports['fl']}",
            "--tick",
            "0.5",
            "--min-samples",
            str(run.opts.min_samples),
            "--max-bake-factor",
            f"{max(3.0, AGENT_METRICS_S * 2.5 / parse_seconds(run.opts.bake)):.1f}",
        ),
    )
    wait_until(lambda: srv.poll() is not None or _http_ok(run.server_url + "/healthz"), 90, "the server", every=0.3)
    if srv.poll() is not None:
        raise StepFailed("edgellm-server run exited", log=run.procs.log_path("server"))
    run.say(f"server on {run.server_url} (MQTT {run.mqtt_url}, Flower SuperLink 127.0.0.1:{run.ports['fl']})")
    root = run.srv / "keys" / "root.json"
    if not root.exists():
        root = run.path("root-keys", "root.json")
    for device, (profile, _tpl, _words) in DEVICES.items():
        text_dir = run.path("devices", device, "text")
        run.heldout[device] = write_local_text(text_dir, device)
        data = run.path("devices", device, "agent")
        run.procs.run(
            f"provision-{device}",
            agent_cmd(
                "provision",
                "--data-dir",
                str(data),
                "--device-id",
                device,
                "--profile",
                profile,
                "--root",
                str(root),
                "--server",
                run.server_url,
                "--mqtt",
                run.mqtt_url,
                "--group",
                GROUP,
                "--train-data",
                str(text_dir),
                "--force",
            ),
        )
        proc = run.procs.start(f"agent-{device}", agent_cmd("run", "--data-dir", str(data), "--listen", "127.0.0.1:0"))
        info = wait_until(functools.partial(_agent_started, proc, data), 60, f"agent {device} to start", every=0.2)
        if proc.poll() is not None:
            raise StepFailed(f"agent {device} exited", log=run.procs.log_path(f"agent-{device}"))
        run.agents[device] = {"profile": profile, "data_dir": data, "url": f"http://127.0.0.1:{info['port']}"}
        run.say(f"agent {device} ({profile}) serving on {run.agents[device]['url']}, data {data}")
    wait_until(
        lambda: sum(1 for d in run.devices() if d.get("online")) == len(DEVICES),
        120,
        "three devices online",
        hint="see logs/agent-*.log",
    )
    run.say("three devices online in group " + GROUP)


def _agent_started(proc: subprocess.Popen, data_dir: Path) -> Any:
    return proc.poll() is not None or _read_json(data_dir / "run" / "agent.json")


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


# -- traffic, rollouts, federated learning -------------------------------------------------------


class Traffic:
    """Real requests to every agent (as their firmware would send) while a canary bakes."""

    def __init__(self, run: Run) -> None:
        self.run, self.sent, self.ok = run, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        from edgellm.client import AgentClient
        from edgellm.errors import EdgeLLMError

        prompts = ["turn on the kitchen light", "status of the garage door", "close the lab valve"]
        while not self._stop.is_set():
            for a in self.run.agents.values():
                c = AgentClient(a["url"], token_file=a["data_dir"] / "api-token", timeout=30)
                try:
                    c.chat([{"role": "user", "content": prompts[self.sent % len(prompts)]}], max_tokens=12)
                    self.ok += 1
                except EdgeLLMError:
                    pass  # no model yet on a device the canary has not reached
                self.sent += 1
            self._stop.wait(0.3)


def _rollout(run: Run, version: str) -> None:
    out = run.server_json(
        "rollout",
        "start",
        "--data-dir",
        str(run.srv),
        "--model",
        MODEL,
        "--version",
        version,
        "--group",
        GROUP,
        "--canary",
        "33%",
        "--gate",
        GATE,
        "--bake",
        run.opts.bake,
        # every device ends on the version's full bundle (the fleet table and the perplexity
        # comparison read it); `rollout start` would otherwise give devices on the base the
        # federated adapter (docs/adapters.md)
        "--prefer",
        "full",
    )
    rid = (out[0] if isinstance(out, list) else out)["id"]
    run.say(f"rollout {rid}: {MODEL} {version} to group {GROUP}, canary 33%, gate {GATE}, bake {run.opts.bake}")
    seen: set[str] = set()

    def done() -> dict[str, Any] | None:
        st = run.server_json("rollout", "status", "--data-dir", str(run.srv), rid)
        st = st[0] if isinstance(st, list) else st
        if st["state"] not in seen:
            seen.add(st["state"])
            run.say(f"rollout {rid}: {st['state']}")
        return st if st["state"] in ("completed", "rolled_back", "aborted", "failed") else None

    with Traffic(run) as traffic:
        st = wait_until(done, 900, f"rollout {rid}", every=1.0)
    run.say(f"{traffic.sent} requests sent while it ran ({traffic.ok} answered)")
    run.rollouts.append({"id": rid, "version": version, "state": st["state"], "gate": GATE, "reason": st.get("reason")})
    if st["state"] != "completed":
        raise StepFailed(
            f"rollout {rid} of {version} ended {st['state']}: {st.get('reason')}",
            hint="see logs/server.log and `edgellm-server rollout status`",
        )
    wait_until(
        lambda: all(d.get("version") == version for d in run.devices()), 120, f"every device to report {version}"
    )


def rollout_v1(run: Run) -> None:
    _rollout(run, V1)


def rollout_v2(run: Run) -> None:
    _rollout(run, V2)


def request(run: Run) -> None:
    from edgellm.client import AgentClient

    device = next(iter(run.agents))
    a = run.agents[device]
    c = AgentClient(a["url"], token_file=a["data_dir"] / "api-token", timeout=60)
    r = c.chat([{"role": "user", "content": PROMPT}], max_tokens=24)
    run.answer = r["choices"][0]["message"]["content"]
    run.say(f"firmware on {device} asks {PROMPT!r} -> {run.answer!r}")


def federated(run: Run) -> None:
    run.say("held-out perplexity of each device's own text on v1, before the federated run:")
    before = measure(run, V1)
    out = run.procs.run(
        "fl-start",
        server_cmd(
            "fl",
            "start",
            "--data-dir",
            str(run.srv),
            "--model",
            MODEL,
            "--version",
            V1,
            "--group",
            GROUP,
            "--rounds",
            str(run.opts.fl_rounds),
            "--min-devices",
            str(len(DEVICES)),
            "--publish",
            V2,
            "--local-steps",
            str(run.opts.fl_local_steps),
            "--lr",
            "3e-3",
            "--lora-rank",
            "4",
            "--lora-alpha",
            "8",
            "--no-rollout",
            "--invite-timeout",
            "2m",
            "--round-timeout",
            "15m",
            "--wait",
            "--format",
            "json",
        ),
        timeout=1800,
        hint="see logs/server.log and devices/*/agent/federated/supernode.log",
    )
    fl = json.loads(out)
    fl = fl[0] if isinstance(fl, list) else fl
    run.say(f"federated run {fl['id']}: {fl['state']}; {MODEL} {V2} published")
    run.federated = {
        "run": fl["id"],
        "state": fl["state"],
        "rounds": run.opts.fl_rounds,
        "version": V2,
        "heldout_perplexity": {d: {"before": b} for d, b in before.items()},
    }


def measure(run: Run, version: str) -> dict[str, float]:
    """Each device's held-out perplexity under what its profile runs at ``version``."""
    out = {}
    for device, a in run.agents.items():
        kind, artifact, d = target_artifact(run.srv / "repo", MODEL, version, a["profile"], run.path("eval"))
        out[device] = perplexity(kind, artifact, run.heldout[device], d)
        run.say(f"  {device}: {out[device]:.2f} ({version}, {kind})")
    return out


def summary(run: Run) -> dict[str, Any]:
    after = measure(run, V2)
    ppl = run.federated.get("heldout_perplexity", {})
    for device, p in after.items():
        ppl.setdefault(device, {})["after"] = p
    devices = run.devices()
    run.say("\n" + fleet_table(devices, ppl))
    token = run.server_json("token", "create", "--data-dir", str(run.srv), "--role", "viewer", "--name", "quickstart")
    token_file = run.path("dashboard-token")
    atomic_write(token_file, (token["token"] + "\n").encode(), mode=0o600)
    run.say(f"dashboard: {run.server_url}/ (viewer token in {token_file})")
    return {
        "workdir": str(run.opts.workdir),
        "model": MODEL,
        "group": GROUP,
        "devices": [
            {
                "id": d["id"],
                "profile": d.get("profile"),
                "version": d.get("version"),
                "online": bool(d.get("online")),
                "url": run.agents.get(d["id"], {}).get("url"),
            }
            for d in devices
        ],
        "rollouts": run.rollouts,
        "federated": run.federated,
        "request": {"prompt": PROMPT, "answer": run.answer},
        "dashboard": run.server_url + "/",
        "dashboard_token_file": str(token_file),
        "server": run.server_url,
        "mqtt": run.mqtt_url,
    }


#: the stages in order: name -> (what it does, the function)
STAGES: dict[str, tuple[str, Callable[[Run], Any]]] = {
    "train": ("train a teacher on the embedded corpus", train),
    "distill": ("distill a student from it", distill),
    "build": ("build bundles for three hardware profiles", build),
    "server": ("initialise a server and its TUF repository, publish v1", server),
    "broker": ("start an MQTT broker", broker),
    "fleet": ("start the server and three agents (separate processes)", fleet),
    "rollout-v1": ("roll v1 out through the canary gate, with real traffic", rollout_v1),
    "request": ("a firmware-style request to one agent", request),
    "federated": ("a federated round on the devices' local text -> v2", federated),
    "rollout-v2": ("roll v2 out through the canary gate", rollout_v2),
    "summary": ("fleet table, held-out perplexity, summary.json", summary),
}

"""Time for a rollout to reach N devices: simulated devices (default) or real agents (``--real N``).

Simulated mode. REAL: Mosquitto, the server's rollout driver and store (this process), the
agents' telemetry code. SIMULATED: the devices: two child processes run N/2 simulated devices
each (agent.telemetry.sim); they "install" a version by sleeping 50 ms after desired state arrives
(no download, no verification, no health check, no bytes moved) and report made-up inference
metrics. Measured side by side in one run:

* a canary rollout (10% canary, gate on p95 latency / error rate / mean logprob, bake B s) of a
  good version: time to the canary, to promotion, and until every device reports the version;
* a canary rollout of a bad version: time until the canary is rolled back by itself;
* a direct push (100% at once, no gate, no bake): the floor set by MQTT + the devices.

    python benchmarks/bench_rollout.py [--devices 100] [--bake 2]

Real mode (``--real N``, see `benchmarks/_rollout_real.py`): N real ``edgellm-agent run`` processes
download, verify (TUF), health-check and switch to a new version of a real GGUF bundle served by
the server's HTTP repository; reports time per phase and bytes moved per device.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures_mqtt import Broker  # noqa: E402
from fixtures_trust import publish_versions  # noqa: E402

from edgellm.telemetry import MqttConfig  # noqa: E402
from server import rollout  # noqa: E402
from server.app import DataDir, Server  # noqa: E402

GATE = "p95_latency_ms<=300,error_rate<=0.05,mean_logprob>=-2.5"


def wait_state(srv: Server, rid: str, states: tuple[str, ...], timeout: float = 600) -> tuple[dict, float]:
    t0 = time.perf_counter()
    while True:
        st = rollout.status(srv.store, rid)[0]
        if st["state"] in states:
            return st, time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"rollout {rid} stuck in {st['state']}")
        time.sleep(0.05)


def phase_times(st: dict) -> dict[str, float]:
    t0 = st["history"][0]["ts"]
    out = {}
    for h in st["history"]:
        out.setdefault(h["state"], h["ts"] - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--bake", type=float, default=2.0)
    ap.add_argument(
        "--real", type=int, default=0, metavar="N", help="N real agent processes instead of simulated devices"
    )
    ap.add_argument("--hidden", type=int, default=768, help="real mode: model width (768 x 16 layers: 101M params)")
    ap.add_argument("--layers", type=int, default=16)
    a = ap.parse_args()
    if a.real:
        from _rollout_real import run_real

        run_real(a.real, a.hidden, a.layers)
        return
    print(
        f"SIMULATED devices ({a.devices}): install = 50 ms sleep, no download or health check; REAL: broker, "
        f"server rollout driver, telemetry; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        broker = Broker(work / "mq")
        broker.start()
        data = DataDir.init(work / "server")
        from edgellm.trust import Repository

        # rollouts assign published versions only
        publish_versions(Repository(data.repo, data.keys), work, ("1.0", "2.0-bad", "2.0", "3.0"))
        srv = Server(data.root, MqttConfig(broker.url), http_port=0, tick_s=0.1, min_samples=20)
        procs = []
        try:
            srv.start()
            assert srv.ingest.wait_connected(10)
            halves = [a.devices // 2, a.devices - a.devices // 2]
            for i, n in enumerate(halves):
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "agent.telemetry.sim",
                            "--mqtt",
                            broker.url,
                            "--devices",
                            str(n),
                            "--prefix",
                            f"fleet{i}",
                            "--data-dir",
                            str(work / f"fleet{i}"),
                            "--group",
                            "bench",
                            "--bad-version",
                            "2.0-bad:900:-3.4",
                            "--infer-every",
                            "0.2",
                            "--metrics-interval",
                            "0.5",
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                        cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)),
                    )
                )
            for p in procs:
                assert p.stdout.readline().strip() == "ready"
            t0 = time.perf_counter()
            while sum(x["online"] for x in srv.store.devices(group="bench")) < a.devices:
                time.sleep(0.05)
            print(f"{a.devices} devices online after {time.perf_counter() - t0:.2f} s")

            rid = rollout.start(
                srv.store, model="demo", version="2.0-bad", group="bench", canary="10%", gate=GATE, bake=f"{a.bake}s"
            )
            st, bad_s = wait_state(srv, rid, ("rolled_back", "completed", "failed"))
            print(f"bad version : {st['state']} after {bad_s:6.2f} s  ({st['reason']})")

            rid = rollout.start(
                srv.store, model="demo", version="2.0", group="bench", canary="10%", gate=GATE, bake=f"{a.bake}s"
            )
            st, good_s = wait_state(srv, rid, ("completed", "rolled_back", "failed"))
            ph = phase_times(st)
            print(
                f"good version: {st['state']} on {st['on_new_version']}/{st['devices']} devices after {good_s:6.2f} s"
                f"  (canary on new version at {ph.get('bake', float('nan')):.2f} s, promoted at "
                f"{ph.get('full', float('nan')):.2f} s, bake {a.bake:g} s)"
            )

            rid = rollout.start(
                srv.store, model="demo", version="3.0", group="bench", canary="100%", no_gate=True, bake="0s"
            )
            st, direct_s = wait_state(srv, rid, ("completed", "rolled_back", "failed"))
            print(
                f"direct push : {st['state']} on {st['on_new_version']}/{st['devices']} devices after {direct_s:6.2f} s"
            )
            print(
                f"ratio canary rollout / direct push: {good_s / direct_s:.2f}x "
                f"(canary rollout minus bake: {good_s - a.bake:.2f} s)"
            )
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=60)
            srv.stop()
            broker.stop()


if __name__ == "__main__":
    main()

"""Telemetry throughput: messages/s from N simulated agents into the server's store.

N agents (one child process, real agent.telemetry outboxes pre-filled with M events each) connect
to a real Mosquitto; the server's ingest (this process) stores everything, deduplicated. The same
run is measured with batched database writes (the default) and with one transaction per message,
side by side, and the ratio is printed.

    .venv/bin/python benchmarks/bench_telemetry.py [--agents 20] [--messages 500]
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

from fixtures_mqtt import Broker  # noqa: E402

from edgellm.telemetry import MqttConfig  # noqa: E402
from server.ingest import Ingest  # noqa: E402
from server.store import Store  # noqa: E402


def run(agents: int, messages: int, batch_size: int, work: Path) -> tuple[float, int]:
    broker = Broker(work / "mq")
    broker.start()
    store = Store(work / "store.sqlite")
    ing = Ingest(store, MqttConfig(broker.url), client_id="bench-server", batch_size=batch_size)
    proc = None
    try:
        ing.start()
        assert ing.wait_connected(10)
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.telemetry.sim", "--mqtt", broker.url, "--devices", str(agents),
             "--data-dir", str(work / "agents"), "--prefill", str(messages), "--infer-every", "0"],
            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.stdout.readline().strip() == "ready"
        t0 = time.perf_counter()
        expected = agents * messages  # the queued events (heartbeats also flow, not counted)
        while store.message_count(kind="event") < expected:
            time.sleep(0.01)
            if time.perf_counter() - t0 > 600:
                raise RuntimeError(f"only {store.message_count(kind='event')} of {expected} stored")
        dt = time.perf_counter() - t0
        return dt, store.message_count(kind="event")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        ing.stop()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--messages", type=int, default=500)
    a = ap.parse_args()
    results = {}
    for label, batch in (("batched (200/tx)", 200), ("one message per tx", 1)):
        with tempfile.TemporaryDirectory() as d:
            dt, n = run(a.agents, a.messages, batch, Path(d))
        results[label] = n / dt
        print(f"{label:<20} {n:>7} messages from {a.agents} agents in {dt:6.2f} s = {n / dt:8.0f} msg/s", flush=True)
    b, s = results["batched (200/tx)"], results["one message per tx"]
    print(f"ratio batched / per-message: {b / s:.2f}x")


if __name__ == "__main__":
    main()

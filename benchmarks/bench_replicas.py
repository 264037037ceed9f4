"""Ingest rate per server replica: N simulated agents (one child process, real agent.telemetry
outboxes pre-filled with M events each) → a real Mosquitto → 1 or 2 `edgellm-server run`
processes (shared subscription) → one database (SQLite, or a real PostgreSQL started here as in
tests/fixtures_pg.py). Prints messages/s stored, in total and per replica.

REAL: Mosquitto, the server processes, the database, the agent telemetry code (outbox, MQTT client).
SIMULATED: the devices (one child process plays all agents; no models, no inference).
The clock starts when the simulated agents are launched (before their first publish, so their
connection time counts against the rate: a lower bound) and stops when the store holds every
event, polled at the store.

    .venv/bin/python benchmarks/bench_replicas.py [--agents 20] [--messages 500]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fixtures_mqtt import Broker, free_port  # noqa: E402
from fixtures_pg import PgServer  # noqa: E402
from waiting import wait_for  # noqa: E402

from server.app import DataDir  # noqa: E402
from server.store import Store  # noqa: E402


def run(agents: int, messages: int, replicas: int, db: str | None, work: Path) -> float:
    broker = Broker(work / "mq")
    broker.start()
    data = DataDir.init(work / "srv", root_keys_out=work / "root-keys").root
    store = Store(db or data / "store.sqlite")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "run",
                "--data-dir",
                str(data),
                "--mqtt",
                broker.url,
                "--http",
                f"127.0.0.1:{free_port()}",
                "--client-id",
                f"bench-{i}",
                *(["--db", db] if db else []),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(replicas)
    ]
    sim = None
    try:
        time.sleep(3)  # replicas connect and subscribe
        t0 = time.perf_counter()  # before the first publish: the outboxes start sending on connect
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.telemetry.sim",
                "--mqtt",
                broker.url,
                "--devices",
                str(agents),
                "--data-dir",
                str(work / "agents"),
                "--prefill",
                str(messages),
                "--infer-every",
                "0",
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert sim.stdout is not None and sim.stdout.readline().strip() == "ready"
        expected = agents * messages
        wait_for(
            lambda: store.message_count(kind="event") >= expected,
            timeout=600,
            every=0.05,
            what=f"{expected} events stored",
        )
        return expected / (time.perf_counter() - t0)
    finally:
        for p in (p for p in [sim, *procs] if p is not None):
            p.terminate()
            p.wait(timeout=60)
        store.close()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=20, help="simulated agents (one process)")
    ap.add_argument("--messages", type=int, default=500, help="events queued in each agent's outbox")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-replicas-", dir="/tmp"))
    os.chmod(root, 0o755)
    pg = PgServer(root / "pg")
    (root / "pg").mkdir()
    pg.start()
    try:
        for label, replicas, db in (
            ("sqlite, 1 replica", 1, None),
            ("postgresql, 1 replica", 1, "pg"),
            ("postgresql, 2 replicas", 2, "pg"),
        ):
            with tempfile.TemporaryDirectory() as d:
                rate = run(a.agents, a.messages, replicas, pg.create_database() if db else None, Path(d))
            print(
                f"{label:<24} {rate:8.0f} msg/s stored, {rate / replicas:8.0f} per replica "
                "(real broker, servers and database; simulated devices; timed from launch to the last stored row)",
                flush=True,
            )
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

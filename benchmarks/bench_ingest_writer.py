"""The ingest writer alone: real wire messages through ``Ingest``'s batch path into a real store.

    python benchmarks/bench_ingest_writer.py [--messages 20000 --batch 500 --rounds 3] [--base main]
        [--store postgresql://user@host:port/db]

REAL: ``server.ingest.Ingest.parse`` and ``_handle`` (strict JSON, every field checked, the
store's transaction, the quarantine path), ``server.store`` on a fresh SQLite file or, with
``--store URL``, a fresh PostgreSQL database made on that server for each run.
SIMULATED: the messages (pre-encoded envelopes, as the agent sends them): ``events`` = events from
40 devices (what bench_telemetry.py sends); ``mixed`` = 10% heartbeats, 45% metrics, 45% events
from 100 devices. No MQTT: the acknowledgements go nowhere.

Prints CPU microseconds per message for the parse alone, the writer's whole batch path
(``_handle``: parse + store) and the store alone, per workload. Each run is a child process; with
``--base REV`` the server code of git revision REV runs too, interleaved round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("events", "mixed")


def messages(workload: str, n: int) -> list:
    from edgellm import telemetry as wire
    from server.ingest import Incoming

    devices = 40 if workload == "events" else 100
    out = []
    for i in range(n):
        d, k = f"bench-{i % devices}", i // devices + 1
        kind, body = "event", {"name": "bench", "fields": {"k": k}}
        if workload == "mixed" and i % 10 == 0:
            kind, body = "heartbeat", {"version": "1.2", "model": "m", "uptime_s": 12.5, "outbox_pending": 3}
        elif workload == "mixed" and i % 2 == 0:
            kind = "metrics"
            body = {"interval_s": 60, "count": 10, "p50_latency_ms": 12.0, "p95_latency_ms": 30.5, "version": "1.2"}
        env = wire.Envelope(device=d, kind=kind, seq=k, ts=time.time(), epoch="bench", body=body)
        out.append(Incoming(i % 65535 + 1, 1, wire.device_topic(d, kind), env.to_json()))
    return out


def fresh_target(store: str | None, work: Path) -> str:
    if not store:
        return str(work / "store.sqlite")
    import psycopg

    name = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(store, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    return store.rsplit("/", 1)[0] + "/" + name


def child(workload: str, n: int, batch: int, store: str | None) -> None:
    from edgellm.telemetry import MqttConfig
    from server.ingest import Ingest
    from server.store import Store

    msgs = messages(workload, n)
    with tempfile.TemporaryDirectory() as d:
        db = Store(fresh_target(store, Path(d)))
        ing = Ingest(db, MqttConfig("mqtt://127.0.0.1:1"))
        for m in msgs[:batch]:  # warm up
            ing.parse(m.topic, m.payload)
        t = time.process_time()
        for s in range(0, n, batch):  # a batch's envelopes live as long as in the writer
            [ing.parse(m.topic, m.payload) for m in msgs[s : s + batch]]
        parse = time.process_time() - t
        envs = [ing.parse(m.topic, m.payload) for m in msgs]
        t = time.process_time()
        for s in range(0, n, batch):
            db.ingest(envs[s : s + batch])
        store_only = time.process_time() - t
        db2 = Store(fresh_target(store, Path(d) / "2")) if store else Store(Path(d) / "2.sqlite")
        ing2 = Ingest(db2, MqttConfig("mqtt://127.0.0.1:1"))
        t = time.process_time()
        for s in range(0, n, batch):
            ing2._handle(msgs[s : s + batch])
        handle = time.process_time() - t
        assert db.message_count() == n and db2.message_count() == n, "not every message was stored"
    us = 1e6 / n
    print(json.dumps({"parse": parse * us, "handle": handle * us, "store": store_only * us}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] or None)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--store", help="a PostgreSQL server URL (a fresh database is made on it per run)")
    ap.add_argument("--base", help="also run the server code of this git revision, interleaved")
    ap.add_argument("--quick", action="store_true", help="a short run (4000 messages, one round)")
    a = ap.parse_args()
    if a.quick:
        a.messages, a.rounds = 4000, 1
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this tree": ROOT}
        if a.base:
            archive = subprocess.run(
                ["git", "archive", a.base, "edgellm", "server"], cwd=ROOT, check=True, capture_output=True
            )
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
            trees[a.base] = Path(tmp)
        load0 = os.getloadavg()
        res: dict[tuple[str, str], list[dict]] = {}
        for _ in range(a.rounds):
            for w in WORKLOADS:
                for name, code in trees.items():
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", w, str(a.messages), str(a.batch), a.store or ""],
                        capture_output=True,
                        text=True,
                        cwd=code,
                        env=dict(os.environ, PYTHONPATH=str(code)),
                        check=True,
                    )
                    res.setdefault((w, name), []).append(json.loads(out.stdout))
        load1 = os.getloadavg()
    print(
        f"REAL: Ingest's batch path and the store ({'PostgreSQL' if a.store else 'SQLite'}). SIMULATED: "
        f"{a.messages} pre-encoded messages per workload, batches of {a.batch}, no MQTT"
    )
    print(f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end on {os.cpu_count()} CPUs; CPU us per message:")
    for (w, name), rs in res.items():
        cols = "  ".join(
            f"{k} {statistics.median(r[k] for r in rs):5.1f} ({' '.join(f'{r[k]:.1f}' for r in rs)})"
            for k in ("parse", "handle", "store")
        )
        print(f"{w:<7} {name:<10} {cols}")


if __name__ == "__main__":
    main()

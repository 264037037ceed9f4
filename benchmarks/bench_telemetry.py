"""Telemetry ingest throughput: messages/s stored by one server process, timed at the store.

    python benchmarks/bench_telemetry.py [--senders 2 --devices 20 --messages 1000 --rounds 2]

REAL: a Mosquitto broker, the server's ``Ingest`` (this process: paho MQTT 5 client, shared
subscription, manual acknowledgements after commit) and its SQLite ``Store``.
SIMULATED: the devices. ``--senders`` child processes each play ``--devices`` devices and publish
``--messages`` pre-encoded ``event`` envelopes per device (``edgellm.telemetry.Envelope``, QoS 1,
the wire format the agent sends) with paho; they are not agent processes (no outbox, no
heartbeats), so the whole CPU left over goes to the broker and the server.

The clock starts at the first publish of any sender (each reports the wall-clock time of its
first publish; they all start on one "go") and stops at the ``received`` time of the last row
the store committed. Loss (events published but not stored) and duplicates (deliveries the
store deduplicated) are counted and must both be zero for a valid run. Each configuration runs
``--rounds`` times, interleaved; medians are printed with the load average (shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

#: ingest configurations compared side by side: name -> Ingest keyword arguments
CONFIGS: dict[str, dict] = {
    "paho as is (per-message acks, 1-byte reads)": {"fast_path": False},
    "fast path (buffered reads, lean PUBLISH decode, one write per batch of acks)": {},
}


def sender_main(url: str, first_device: int, devices: int, messages: int) -> None:
    """A child process: connect, wait for "go" on stdin, publish, wait for every PUBACK."""
    import paho.mqtt.client as mqtt

    from edgellm import telemetry as wire
    from edgellm.telemetry import MqttConfig

    cfg = MqttConfig(url)
    payloads = []
    epoch = f"bench{os.getpid()}"
    for k in range(messages):
        for d in range(first_device, first_device + devices):
            env = wire.Envelope(
                device=f"bench-{d}",
                kind="event",
                seq=k + 1,
                ts=time.time(),
                epoch=epoch,
                body={"name": "bench", "fields": {"k": k}},
            )
            payloads.append((wire.device_topic(env.device, "event"), env.to_json()))
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sender-{first_device}", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(cfg.host, cfg.port, keepalive=60)
    c.loop_start()
    print("connected", flush=True)
    sys.stdin.readline()
    first = time.time()
    infos = [c.publish(t, p, qos=1) for t, p in payloads]
    for i in infos:
        i.wait_for_publish(timeout=300)
    print(json.dumps({"first_publish": first, "published": len(infos)}), flush=True)
    c.disconnect()
    c.loop_stop()


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads by role (paho's network thread, the ingest writer, the rest)."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            f = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(task.name), "other")
        role = "paho" if name.startswith("paho") else "writer" if name == "ingest-writer" else "other"
        out[role] = out.get(role, 0.0) + (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return out


def run(cfg: dict, senders: int, devices: int, messages: int, work: Path) -> dict:
    from fixtures_mqtt import Broker

    from edgellm.telemetry import MqttConfig
    from server.ingest import Ingest
    from server.store import Store

    broker = Broker(work / "mq")
    broker.start()
    store = Store(work / "store.sqlite")
    ing = Ingest(store, MqttConfig(broker.url), client_id="bench-server", **cfg)
    procs: list[subprocess.Popen] = []
    try:
        ing.start()
        assert ing.wait_connected(10), "the ingest did not connect"
        for s in range(senders):
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--sender", broker.url, str(s * devices), str(devices), str(messages)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                    env=dict(os.environ, PYTHONPATH=str(ROOT)),
                )
            )
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "connected"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        expected = senders * devices * messages
        cpu0, th0 = time.process_time(), thread_cpu()
        t0 = time.monotonic()
        while store.message_count(kind="event") < expected and time.monotonic() - t0 < 600:
            time.sleep(0.05)
        cpu = time.process_time() - cpu0  # this process: paho's network thread + the writer (+ this poll)
        th = {k: v - th0.get(k, 0.0) for k, v in thread_cpu().items()}
        reports = [json.loads(p.stdout.readline()) for p in procs if p.stdout is not None]
        time.sleep(0.5)  # late redeliveries would show up as duplicates
        stored = store.message_count(kind="event")
        last = store.db.execute("SELECT MAX(received) FROM messages WHERE kind = 'event'").fetchone()[0]
        first = min(r["first_publish"] for r in reports)
        counters = dict(ing.counters)
        return {
            "stored": stored,
            "expected": expected,
            "seconds": last - first,
            "rate": stored / (last - first),
            "cpu_us": cpu / max(stored, 1) * 1e6,
            **{f"{k}_us": v / max(stored, 1) * 1e6 for k, v in th.items()},
            "lost": expected - stored,
            "duplicates": counters.get("duplicates", 0),
        }
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
        ing.stop()
        broker.stop()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--sender":
        sender_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--senders", type=int, default=2)
    ap.add_argument("--devices", type=int, default=20, help="devices per sender")
    ap.add_argument("--messages", type=int, default=1000, help="events per device")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--quick", action="store_true", help="a short run (fewer messages, one round)")
    a = ap.parse_args()
    if a.quick:
        a.messages, a.rounds = 200, 1
    names = [n for n in CONFIGS if n in a.configs.split(",")] or list(CONFIGS)
    load0 = os.getloadavg()
    results: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(a.rounds):
        for n in names:
            with tempfile.TemporaryDirectory() as d:
                results[n].append(run(CONFIGS[n], a.senders, a.devices, a.messages, Path(d)))
    load1 = os.getloadavg()
    total = a.senders * a.devices * a.messages
    print(
        f"REAL: Mosquitto, the server's Ingest + SQLite Store (one process). SIMULATED: {a.senders} sender "
        f"processes x {a.devices} devices x {a.messages} events = {total} QoS-1 messages (paho, pre-encoded envelopes)"
    )
    print(
        f"timed from the first publish to the last stored row; load average {load0[0]:.2f} at start, "
        f"{load1[0]:.2f} at end on {os.cpu_count()} CPUs (shared machine)"
    )
    for n in names:
        rs = results[n]
        rates = " ".join(f"{r['rate']:.0f}" for r in rs)
        print(
            f"{n:<78} median {statistics.median(r['rate'] for r in rs):7.0f} msg/s stored, "
            f"{statistics.median(r['cpu_us'] for r in rs):5.0f} us CPU/msg in the server process (paho "
            f"{statistics.median(r.get('paho_us', 0) for r in rs):.0f}, writer "
            f"{statistics.median(r.get('writer_us', 0) for r in rs):.0f})   "
            f"runs: {rates}   lost {sum(r['lost'] for r in rs)}, duplicates {sum(r['duplicates'] for r in rs)}"
        )


if __name__ == "__main__":
    main()

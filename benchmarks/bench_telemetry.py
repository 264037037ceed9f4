"""Telemetry ingest throughput: messages/s stored by the server, timed at the store.

    python benchmarks/bench_telemetry.py [--senders 2 --devices 20 --messages 1000 --rounds 2]
        [--configs "one process,2 processes"] [--base main]

REAL: a Mosquitto broker (the test fixture's config, with ``max_inflight_messages`` left at
Mosquitto's default of 20 as in the server's generated config: what an ingest that does not ask
for a window through MQTT 5 Receive Maximum gets; ``--broker-inflight N`` sets it), the server's
``Ingest`` (paho MQTT 5 client, shared subscription, acknowledgements after commit) and its
SQLite ``Store``, in server processes of their own (``--workers``-like configurations start
several on the shared subscription, each with its own client id, all on one SQLite file).
SIMULATED: the devices. ``--senders`` child processes each play ``--devices`` devices and publish
``--messages`` pre-encoded ``event`` envelopes per device (``edgellm.telemetry.Envelope``, QoS 1,
the wire format the agent sends) as pre-built MQTT 5 packets on a plain socket (``--sender raw``,
the default: every PUBACK checked, the broker's window respected) or with paho (``--sender paho``,
about 115 µs of CPU per publish here, which then takes most of the two CPUs); they are not agent processes (no outbox, no
heartbeats), so the whole CPU left over goes to the broker and the server.

The clock starts at the first publish of any sender (each reports the wall-clock time of its
first publish; they all start on one "go") and stops at the ``received`` time of the last row
the store committed. Loss (events published but not in ``messages`` and ``events``) and
duplicates (rows beyond one per event, and deliveries the store deduplicated) are counted and
must be zero for a valid run. The server processes' CPU time (all threads) is divided by the
messages stored. Each configuration runs ``--rounds`` times, interleaved; with ``--base REV`` every
configuration also runs with the server code of git revision REV (exported to a temporary
directory), interleaved with this tree's, so old and new are compared under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

#: configurations compared side by side: name -> (server processes, Ingest keyword arguments)
CONFIGS: dict[str, tuple[int, dict]] = {
    "one process": (1, {}),
    "paho as is (one process)": (1, {"fast_path": False}),
    "2 processes (shared subscription)": (2, {}),
}
DEFAULT_CONFIGS = "one process,2 processes (shared subscription)"


def sender_main(client: str, url: str, first_device: int, devices: int, messages: int) -> None:
    """A child process: connect, wait for "go" on stdin, publish, wait for every PUBACK."""
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
    if client == "raw":
        RawPublisher(cfg.host, cfg.port, f"bench-sender-{first_device}").run(payloads)
        return
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sender-{first_device}", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(cfg.host, cfg.port, keepalive=60)
    c.loop_start()
    print("connected", flush=True)
    sys.stdin.readline()
    first, cpu = time.time(), time.process_time()
    infos = [c.publish(t, p, qos=1) for t, p in payloads]
    for i in infos:
        i.wait_for_publish(timeout=300)
    cpu = time.process_time() - cpu
    print(json.dumps({"first_publish": first, "published": len(infos), "cpu": cpu}), flush=True)
    c.disconnect()
    c.loop_stop()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (128 if n else 0))
        if not n:
            return bytes(out)


class RawPublisher:
    """A light simulated device fleet: MQTT 5 over a plain socket, PUBLISH packets (QoS 1) built
    before the clock starts and written many per ``send``, PUBACKs read in bulk, never more
    unacknowledged than the broker's Receive Maximum. paho costs ~115 us of CPU per publish
    here, more than the broker and the server together."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        import socket

        self.sock = socket.create_connection((host, port))
        cid = client_id.encode()
        body = b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + len(cid).to_bytes(2, "big") + cid
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        self.buf = b""
        kind, connack = self._packet()
        assert kind == 0x20 and connack[1] == 0, f"CONNACK refused: {connack!r}"
        self.window = 65535
        props, i = connack[3:], 0  # after flags, reason code and the property length (< 128 here)
        while i < len(props):
            pid = props[i]
            if pid == 0x21:  # Receive Maximum
                self.window = int.from_bytes(props[i + 1 : i + 3], "big")
            i += 1 + {0x11: 4, 0x21: 2, 0x22: 2, 0x24: 1, 0x25: 1, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1}.get(pid, 0)
            if pid not in (0x11, 0x21, 0x22, 0x24, 0x25, 0x27, 0x28, 0x29, 0x2A):
                break  # a string property: the rest does not matter here

    def _packet(self) -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= 2:
                n, mult, i = 0, 1, 1
                while i < len(self.buf):
                    b = self.buf[i]
                    n += (b & 127) * mult
                    mult *= 128
                    i += 1
                    if not b & 128:
                        if len(self.buf) >= i + n:
                            kind, body, self.buf = self.buf[0] & 0xF0, self.buf[i : i + n], self.buf[i + n :]
                            return kind, body
                        break
            data = self.sock.recv(1 << 16)
            assert data, "the broker closed the connection"
            self.buf += data

    def run(self, payloads: list[tuple[str, bytes]]) -> None:
        packets = []
        for k, (topic, payload) in enumerate(payloads):
            t = topic.encode()
            body = len(t).to_bytes(2, "big") + t + (k % 65535 + 1).to_bytes(2, "big") + b"\x00" + payload
            packets.append(b"\x32" + _varint(len(body)) + body)
        print("connected", flush=True)
        sys.stdin.readline()
        first, cpu = time.time(), time.process_time()
        sent = acked = 0
        while acked < len(packets):
            n = min(len(packets) - sent, self.window - (sent - acked))
            if n > 0:
                self.sock.sendall(b"".join(packets[sent : sent + n]))
                sent += n
            kind, body = self._packet()
            if kind == 0x40:
                assert len(body) == 2 or body[2] < 0x80, f"PUBACK with reason {body[2]:#x}"
                acked += 1
        cpu = time.process_time() - cpu
        print(json.dumps({"first_publish": first, "published": len(packets), "cpu": cpu}), flush=True)
        self.sock.sendall(b"\xe0\x00")
        self.sock.close()


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


def server_main(url: str, db: str, client_id: str, kwargs: str) -> None:
    """A server process (this tree's code or a base revision's, by PYTHONPATH): ingest into ``db``
    between "go" and "stop" on stdin, then print its CPU time and counters."""
    from edgellm.telemetry import MqttConfig
    from server.ingest import Ingest
    from server.store import Store

    sizes: list[int] = []  # batch sizes, whatever the revision counts itself
    handle = Ingest._handle

    def counted(self: Ingest, batch: list) -> None:
        sizes.append(len(batch))
        handle(self, batch)

    Ingest._handle = counted  # type: ignore[method-assign]
    ing = Ingest(Store(db), MqttConfig(url), client_id=client_id, **json.loads(kwargs))
    ing.start()
    assert ing.wait_connected(10), "the ingest did not connect"
    print("ready", flush=True)
    sys.stdin.readline()
    cpu0, th0 = time.process_time(), thread_cpu()
    sys.stdin.readline()
    th = {k: v - th0.get(k, 0.0) for k, v in thread_cpu().items()}
    print(
        json.dumps(
            {"cpu": time.process_time() - cpu0, "threads": th, "counters": dict(ing.counters), "batches": len(sizes)}
        ),
        flush=True,
    )
    ing.stop()


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _child(argv: list[str], pythonpath: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=pythonpath,
        env=dict(os.environ, PYTHONPATH=str(pythonpath)),
    )


def _tell(procs: list[subprocess.Popen], line: str) -> None:
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(line + "\n")
        p.stdin.flush()


def _expect(p: subprocess.Popen, line: str) -> None:
    assert p.stdout is not None
    got = p.stdout.readline().strip()
    assert got == line, f"expected {line!r} from a child process, got {got!r}"


def _count(db: Path, sql: str) -> float:
    con = sqlite3.connect(str(db), timeout=30)
    try:
        return con.execute(sql).fetchone()[0] or 0
    finally:
        con.close()


def run(
    workers: int,
    kwargs: dict,
    code: Path,
    inflight: int | None,
    sender: str,
    senders: int,
    devices: int,
    messages: int,
    work: Path,
) -> dict:
    from fixtures_mqtt import Broker

    broker = Broker(work / "mq")
    conf = broker.config.read_text().replace("max_inflight_messages 100\n", "")
    broker.config.write_text(conf + (f"max_inflight_messages {inflight}\n" if inflight is not None else ""))
    broker.start()
    db = work / "store.sqlite"
    servers: list[subprocess.Popen] = []
    procs: list[subprocess.Popen] = []
    try:
        for i in range(workers):  # one after the other: the first one creates the store
            servers.append(_child(["--server", broker.url, str(db), f"bench-server-{i}", json.dumps(kwargs)], code))
            _expect(servers[-1], "ready")
        for s in range(senders):
            procs.append(_child(["--sender", sender, broker.url, str(s * devices), str(devices), str(messages)], ROOT))
        for p in procs:
            _expect(p, "connected")
        assert broker.proc is not None
        broker_cpu = proc_cpu(broker.proc.pid)
        _tell(servers, "go")
        _tell(procs, "go")
        expected = senders * devices * messages
        t0 = time.monotonic()
        while _count(db, "SELECT COUNT(*) FROM messages") < expected and time.monotonic() - t0 < 600:
            time.sleep(0.05)
        broker_cpu = proc_cpu(broker.proc.pid) - broker_cpu
        reports = [json.loads(p.stdout.readline()) for p in procs if p.stdout is not None]
        time.sleep(0.5)  # late redeliveries would show up as duplicates
        _tell(servers, "stop")
        stats = [json.loads(s.stdout.readline()) for s in servers if s.stdout is not None]
        stored = int(_count(db, "SELECT COUNT(*) FROM messages WHERE kind = 'event'"))
        events = int(_count(db, "SELECT COUNT(*) FROM events"))
        last = _count(db, "SELECT MAX(received) FROM messages")
        first = min(r["first_publish"] for r in reports)
        counters: dict[str, int] = {}
        for s in stats:
            for k, v in s["counters"].items():
                counters[k] = counters.get(k, 0) + v
        threads = {role: sum(s["threads"].get(role, 0.0) for s in stats) for role in ("paho", "writer")}
        return {
            "rate": stored / (last - first),
            "cpu_us": sum(s["cpu"] for s in stats) / max(stored, 1) * 1e6,
            **{f"{k}_us": v / max(stored, 1) * 1e6 for k, v in threads.items()},
            "sender_us": sum(r["cpu"] for r in reports) / expected * 1e6,
            "broker_us": broker_cpu / expected * 1e6,
            "batch": counters.get("received", 0) / max(sum(s["batches"] for s in stats), 1),
            "lost": expected - min(stored, events),
            "duplicates": counters.get("duplicates", 0) + max(stored, events) - min(stored, events),
        }
    finally:
        for p in procs + servers:
            p.kill()
            p.wait(timeout=30)
        broker.stop()


def export_revision(rev: str, into: Path) -> Path:
    """The tree of git revision ``rev`` (its ``edgellm`` and ``server`` packages) under ``into``."""
    archive = subprocess.run(["git", "archive", rev, "edgellm", "server"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--sender":
        sender_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--server":
        server_main(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--senders", type=int, default=2)
    ap.add_argument("--devices", type=int, default=20, help="devices per sender")
    ap.add_argument("--messages", type=int, default=1000, help="events per device")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--sender",
        choices=("raw", "paho"),
        default="raw",
        help="simulated devices' MQTT client (raw: pre-built packets)",
    )
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument(
        "--broker-inflight",
        type=int,
        help="Mosquitto's max_inflight_messages (default: not set, Mosquitto's 20, as in the server's generated config)",
    )
    ap.add_argument("--base", help="also run each configuration with the server code of this git revision")
    ap.add_argument("--quick", action="store_true", help="a short run (fewer messages, one round)")
    a = ap.parse_args()
    if a.quick:
        a.messages, a.rounds = 200, 1
    names = [n for n in CONFIGS if n in a.configs.split(",")] or list(CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"": ROOT}
        if a.base:
            trees[f"{a.base}: "] = export_revision(a.base, Path(tmp))
        variants = [(label + n, n, code) for label, code in trees.items() for n in names]
        load0 = os.getloadavg()
        results: dict[str, list[dict]] = {v: [] for v, _, _ in variants}
        for _ in range(a.rounds):
            for v, n, code in variants:
                with tempfile.TemporaryDirectory() as d:
                    results[v].append(
                        run(*CONFIGS[n], code, a.broker_inflight, a.sender, a.senders, a.devices, a.messages, Path(d))
                    )
        load1 = os.getloadavg()
    total = a.senders * a.devices * a.messages
    print(
        f"REAL: Mosquitto, the server's Ingest + SQLite Store (server processes of their own). SIMULATED: {a.senders} "
        f"sender processes x {a.devices} devices x {a.messages} events = {total} QoS-1 MQTT 5 messages ("
        f"{'pre-built packets on a plain socket' if a.sender == 'raw' else 'paho'}, pre-encoded envelopes)"
    )
    window = a.broker_inflight if a.broker_inflight is not None else "20 (default)"
    print(f"Mosquitto max_inflight_messages {window}; this tree's ingest asks for 2 batches (MQTT 5 Receive Maximum)")
    print(
        f"timed from the first publish to the last stored row; load average {load0[0]:.2f} at start, "
        f"{load1[0]:.2f} at end on {os.cpu_count()} CPUs (shared machine)"
    )
    for v, _, _ in variants:
        rs = results[v]
        rates = " ".join(f"{r['rate']:.0f}" for r in rs)
        print(
            f"{v:<48} median {statistics.median(r['rate'] for r in rs):6.0f} msg/s stored, "
            f"{statistics.median(r['cpu_us'] for r in rs):4.0f} us server CPU/msg (paho "
            f"{statistics.median(r.get('paho_us', 0) for r in rs):.0f}, writer "
            f"{statistics.median(r.get('writer_us', 0) for r in rs):.0f})"
            + f", mean batch {statistics.median(r['batch'] for r in rs):.0f}"
            + f"; senders {statistics.median(r['sender_us'] for r in rs):.0f}, Mosquitto "
            f"{statistics.median(r['broker_us'] for r in rs):.0f} us CPU/msg"
            + f"   runs: {rates}   lost {sum(r['lost'] for r in rs)}, duplicates {sum(r['duplicates'] for r in rs)}"
        )


if __name__ == "__main__":
    main()

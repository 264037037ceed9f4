"""Real-agent mode of bench_rollout.py (``--real N``): N ``edgellm-agent run`` processes take a real update.

REAL, nothing simulated: Mosquitto, the server (rollout driver, store, HTTP TUF repository, in
this process), N agent processes provisioned against it, a random Llama exported to Q8_0 GGUF
(default 101M parameters) packed into signed bundles 1.0.0 and 1.1.0. Each agent reaches the
server through its own byte-counting HTTP proxy (this process), so the bytes each device moved
are measured, not computed.

Phases reported: the offline install of 1.0.0 (``edgellm-agent install`` of a signed envelope:
verify, unpack, health check) per device; then a server rollout of 1.1.0 (canary 100%, bake 1 s):
time until each device reported ``update.installed`` (TUF download, verification, health check,
switch) and until the rollout completed; bytes moved per device.
"""

from __future__ import annotations

import http.server
import json
import os
import statistics
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


class CountingProxy:
    """GET-only HTTP forwarder to ``upstream`` that counts the bytes it sends back."""

    def __init__(self, upstream: str) -> None:
        self.bytes = 0
        self.requests = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                try:
                    resp = urllib.request.urlopen(upstream + self.path, timeout=60)
                    status = resp.status
                except urllib.error.HTTPError as e:
                    resp, status = e, e.code
                body = resp.read()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                proxy.bytes += len(body)
                proxy.requests += 1

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def run_real(n: int, hidden: int, layers: int) -> None:
    import tempfile

    from bench_gguf import export_all, make_model
    from fixtures_agent import AgentProcess, agent_cli, make_gguf_bundle, provision_agent
    from fixtures_mqtt import Broker
    from waiting import wait_for

    from edgellm.telemetry import MqttConfig
    from edgellm.trust import Repository, init_keys
    from server import rollout
    from server.app import Server

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-rollout-real-") as td:
        work = Path(td)
        gguf = export_all(make_model(work, hidden, layers), work, ("gguf-q8_0",))["gguf-q8_0"]
        size = gguf.stat().st_size
        golden = [{"prompt": "The robot", "max_tokens": 8}]
        bundles = {v: make_gguf_bundle(work, gguf, version=v, golden=golden) for v in ("1.0.0", "1.1.0")}
        data = work / "srv"
        root = init_keys(data / "keys")
        repo = Repository.create(data / "repo", data / "keys")
        names = {v: repo.add_bundle(p) for v, p in bundles.items()}
        v1 = repo.export_signed(names["1.0.0"], work / "v1.signed")
        (data / "server.json").write_text(json.dumps({"format": "edgellm-server", "version": 1}))
        broker = Broker(work / "mq")
        broker.start()
        agents: list[AgentProcess] = []
        proxies: list[CountingProxy] = []
        try:
            with Server(data, MqttConfig(broker.url), http_port=0, tick_s=0.2) as srv:
                assert srv.ingest.wait_connected(10)
                offline = []
                for i in range(n):
                    proxies.append(CountingProxy(srv.url))
                    d = provision_agent(
                        work / f"agent{i}",
                        root,
                        server=proxies[i].url,
                        args=("--device-id", f"dev-{i}", "--mqtt", broker.url, "--group", "bench"),
                    )
                    t0 = time.perf_counter()
                    agent_cli("install", str(v1), data_dir=d, timeout=600)
                    offline.append(time.perf_counter() - t0)
                    agents.append(AgentProcess(d))
                wait_for(
                    lambda: all(
                        (x := srv.store.device(f"dev-{i}")) and x["online"] and x["version"] == "1.0.0"
                        for i in range(n)
                    ),
                    600,
                    "every agent online on 1.0.0",
                    every=0.1,
                )
                for p in proxies:
                    p.bytes = p.requests = 0
                t_start = time.time()
                rid = rollout.start(
                    srv.store, model="tiny", version="1.1.0", group="bench", canary="100%", bake="1s", no_gate=True
                )
                st = wait_for(
                    lambda: (
                        (s := rollout.status(srv.store, rid)[0])["state"] in ("completed", "rolled_back", "failed")
                        and s
                    ),
                    600,
                    "the rollout",
                    every=0.1,
                )
                total_s = time.time() - t_start
                installed = []
                for i in range(n):
                    ts = [e["received"] for e in srv.store.events(device=f"dev-{i}") if e["name"] == "update.installed"]
                    installed.append(max(ts) - t_start if ts else float("nan"))
        finally:
            for a in agents:
                a.stop()
            for p in proxies:
                p.close()
            broker.stop()
    print(
        f"REAL: {n} edgellm-agent processes, Mosquitto, the server (HTTP TUF repository, rollout driver); "
        f"model {size / 2**20:.1f} MiB Q8_0 GGUF; nothing simulated"
    )
    print(f"load average {load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end on {os.cpu_count()} CPUs (shared)")
    print(
        f"offline install of 1.0.0 (verify + unpack + health check), per device: median "
        f"{statistics.median(offline):.2f} s  ({' '.join(f'{x:.2f}' for x in offline)})"
    )
    print(
        f"rollout of 1.1.0: {st['state']} on {st.get('on_new_version')}/{st.get('devices')} devices after "
        f"{total_s:.2f} s (includes 1 s bake); update.installed reported after "
        f"{' '.join(f'{x:.2f}' for x in installed)} s"
    )
    print(
        f"bytes moved per device (HTTP from the server): {' '.join(f'{p.bytes / 2**20:.2f}' for p in proxies)} MiB "
        f"in {' '.join(str(p.requests) for p in proxies)} requests; the model file is {size / 2**20:.2f} MiB"
    )

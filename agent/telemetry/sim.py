"""Simulated devices for tests, benchmarks and demos.

A :class:`SimDevice` speaks the real protocol through the real :class:`~agent.telemetry.Telemetry`
(real MQTT, real outbox); only the model is fake: when desired state arrives it "installs" the
version after ``install_s`` and then reports inference metrics whose latency, quality
(mean logprob) and error rate come from ``behaviour[version]``.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from pathlib import Path
from typing import Any

from agent.telemetry.client import Telemetry
from edgellm.telemetry import EventName, MqttConfig


@dataclasses.dataclass(frozen=True)
class Behaviour:
    latency_ms: float = 100.0
    mean_logprob: float = -1.5
    error_rate: float = 0.0
    tokens_per_second: float = 40.0


class SimDevice:
    def __init__(
        self,
        device_id: str,
        data_dir: Path,
        mqtt: MqttConfig,
        *,
        profile: str = "sim",
        group: str = "default",
        model: str = "demo",
        version: str = "1.0",
        behaviour: dict[str, Behaviour] | None = None,
        install_s: float = 0.05,
        infer_every_s: float = 0.05,
        metrics_interval_s: float = 0.5,
        heartbeat_s: float = 5.0,
        fail_versions: tuple[str, ...] = (),
        seed: int | None = None,
        **telemetry_kw: Any,
    ) -> None:
        self.id = device_id
        self.model = model
        self.version = version
        self.behaviour = behaviour or {}
        self.install_s = install_s
        self.infer_every_s = infer_every_s
        self.fail_versions = fail_versions
        self.installs: list[str] = []
        self.desired: list[dict[str, Any]] = []
        self._rng = random.Random(seed if seed is not None else hash(device_id))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.telemetry = Telemetry(
            device_id,
            Path(data_dir),
            mqtt,
            profile,
            group,
            heartbeat_s=heartbeat_s,
            metrics_interval_s=metrics_interval_s,
            **telemetry_kw,
        )
        self.telemetry.on_desired(self._on_desired)

    def start(self, *, infer: bool = True) -> SimDevice:
        self.telemetry.set_state(version=self.version, model=self.model, slot="a", health="ok")
        self.telemetry.start()
        if infer:
            self._thread = threading.Thread(target=self._infer_loop, name=f"sim-{self.id}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.telemetry.stop()

    def _on_desired(self, d: dict[str, Any]) -> None:
        self.desired.append(d)
        version = d["version"]
        if version == self.version:
            return
        self.telemetry.event(
            EventName.UPDATE_STARTED.value, version=version, model=d["model"], rollout=d.get("rollout")
        )
        if self._stop.wait(self.install_s):
            return
        if version in self.fail_versions:
            self.telemetry.event(
                EventName.UPDATE_FAILED.value, version=version, error="health check failed (simulated)"
            )
            return
        self.version, self.model = version, d["model"]
        self.installs.append(version)
        self.telemetry.set_state(version=version, model=d["model"], slot="b" if len(self.installs) % 2 else "a")
        self.telemetry.event(EventName.UPDATE_INSTALLED.value, version=version, model=d["model"])

    def _infer_loop(self) -> None:
        while not self._stop.wait(self.infer_every_s):
            b = self.behaviour.get(self.version, Behaviour())
            lat = max(1.0, self._rng.gauss(b.latency_ms, b.latency_ms * 0.05))
            self.telemetry.record_inference(
                latency_ms=lat,
                prompt_tokens=self._rng.randint(8, 64),
                completion_tokens=32,
                tokens_per_second=b.tokens_per_second * self._rng.uniform(0.95, 1.05),
                mean_logprob=b.mean_logprob + self._rng.uniform(-0.05, 0.05),
                error=self._rng.random() < b.error_rate,
            )


def main(argv: list[str] | None = None) -> None:
    """``python -m agent.telemetry.sim --mqtt URL --devices N --data-dir DIR``: run a simulated
    fleet until SIGTERM/SIGINT (for demos and benchmarks). Prints ``ready`` once all started."""
    import argparse
    import signal
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--mqtt", required=True)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--prefix", default="sim")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--group", default="default")
    ap.add_argument("--version", default="1.0")
    ap.add_argument("--bad-version", action="append", default=[], help="VERSION:LATENCY_MS:MEAN_LOGPROB")
    ap.add_argument("--infer-every", type=float, default=0.1)
    ap.add_argument("--metrics-interval", type=float, default=1.0)
    ap.add_argument("--prefill", type=int, default=0, help="events queued in each outbox before connecting")
    args = ap.parse_args(argv)
    behaviour = {}
    for spec in args.bad_version:
        v, lat, lp = spec.split(":")
        behaviour[v] = Behaviour(latency_ms=float(lat), mean_logprob=float(lp))
    devs = [
        SimDevice(
            f"{args.prefix}-{i:03d}",
            Path(args.data_dir) / f"{i:03d}",
            MqttConfig(args.mqtt),
            group=args.group,
            version=args.version,
            behaviour=behaviour,
            infer_every_s=args.infer_every,
            metrics_interval_s=args.metrics_interval,
            heartbeat_s=30.0,
        )
        for i in range(args.devices)
    ]
    for d in devs:
        for k in range(args.prefill):
            d.telemetry.event("prefill", k=k)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    for d in devs:
        d.start(infer=args.infer_every > 0)
    print("ready", flush=True)
    stop.wait()
    for d in devs:
        d.stop()
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()

"""Prometheus metrics of the local API (own registry; nothing global)."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu, fds
        self.requests = Counter(
            "edgellm_agent_requests", "API requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "edgellm_agent_request_duration_seconds",
            "API request duration",
            ["endpoint"],
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.ttft = Histogram(
            "edgellm_agent_time_to_first_token_seconds",
            "Time to the first generated token",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.tps = Histogram(
            "edgellm_agent_tokens_per_second",
            "Decode speed per request",
            registry=r,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
        )
        self.tokens = Counter("edgellm_agent_tokens", "Tokens processed", ["kind"], registry=r)
        self.queue_depth = Gauge("edgellm_agent_queue_depth", "Requests waiting or running", registry=r)
        self.rejected = Counter(
            "edgellm_agent_rejected_requests", "Requests refused (queue full, limits, auth)", ["reason"], registry=r
        )
        self.model_info = Gauge(
            "edgellm_agent_model_info",
            "The served model (value 1)",
            ["model", "version", "slot", "runtime"],
            registry=r,
        )
        self.rss = Gauge("edgellm_agent_rss_bytes", "Resident memory of the agent", registry=r)
        self.rss.set_function(rss_bytes)
        self.updates = Counter("edgellm_agent_updates", "Update attempts by result", ["result"], registry=r)

    def set_model(self, handle: Any) -> None:
        self.model_info.clear()
        if handle is not None:
            self.model_info.labels(handle.name, handle.version, handle.slot or "", handle.kind).set(1)

    def observe_generation(self, stats: dict) -> None:
        self.tokens.labels("prompt").inc(stats["prompt_tokens"])
        self.tokens.labels("completion").inc(stats["completion_tokens"])
        if stats.get("time_to_first_token_s") is not None:
            self.ttft.observe(stats["time_to_first_token_s"])
        if stats["completion_tokens"] > 1:
            self.tps.observe(stats["tokens_per_second"])

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""The server's /metrics during a rollout passes Prometheus' own checker (promtool, from Debian's
prometheus package), has one series per label set, and holds every metric the Grafana dashboard
in docs/ reads; the devices view shows desired vs running, drift, rejected and last error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_rollout_driver import env, published  # noqa: F401 - fixtures

from server import rollout
from server.fleet import device_views, prometheus_text

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def _mid_rollout(env):  # noqa: F811
    store, fleet, pub, drv = env
    for d in ("m1", "m2", "m3"):
        fleet.birth(d)
    rid = rollout.start(store, model="m", version="2.0", group="g", canary="34%", gate="p95_latency_ms<=100", bake="1h")
    drv.tick()
    canary = [d["device"] for d in rollout.status(store, rid)[0]["device_states"] if d["phase"] == "canary"]
    for d in canary:
        fleet.report(d, "2.0")
    drv.tick()
    fleet.metrics(canary[0], "2.0", count=4, p95=50)
    fleet.metrics("m3", "1.0", count=4, p95=70)
    fleet.metrics("m3", "1.0", count=4, p95=90)  # two intervals of one version: still one series
    fleet.send(
        "m3",
        "event",
        {"name": "update.failed", "fields": {"version": "3.0", "reason": "disk full", "rejected": ["3.0"]}},
    )
    assert rollout.status(store, rid)[0]["state"] == "bake"
    return store, drv, rid


@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool (Debian package prometheus) not installed")
def test_metrics_during_a_rollout_pass_promtool(env):  # noqa: F811
    store, drv, rid = _mid_rollout(env)
    text = prometheus_text(store, drv.director)
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.stdout, r.stderr, text)
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert len(series) == len(set(series))
    assert f'edgellm_rollout_state{{group="g",rollout="{rid}",state="bake",version="2.0"}} 1' in text
    assert f'edgellm_rollout_samples{{group="g",rollout="{rid}",version="2.0"}} 4' in text
    assert 'edgellm_devices_update_error{group="g"} 1' in text


def test_the_grafana_dashboard_reads_metrics_the_server_exposes(env):  # noqa: F811
    store, drv, _ = _mid_rollout(env)
    text = prometheus_text(store, drv.director)
    exposed = set(re.findall(r"^# TYPE (\w+) ", text, re.M))
    dash = json.loads((Path(__file__).parents[1] / "docs" / "grafana-fleet.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bedgellm_\w+", e)}
    assert used and used <= exposed, used - exposed


def test_devices_view_shows_desired_running_drift_rejected_and_last_error(env):  # noqa: F811
    store, drv, _ = _mid_rollout(env)
    views = {v["id"]: v for v in device_views(store, drv.director)}
    canary = next(d for d, v in views.items() if v["desired"] == "2.0")
    assert views[canary]["version"] == "2.0" and views[canary]["drift"] is False
    assert views["m3"]["desired"] == "1.0" and views["m3"]["drift"] is False
    assert views["m3"]["rejected"] == ["3.0"] and views["m3"]["last_error"] == "3.0: disk full"

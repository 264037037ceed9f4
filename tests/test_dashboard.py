"""The fleet dashboard in headless Chromium (Debian's `chromium`): the page renders the fleet
table, rollout history and SVG charts from the JSON API with no network beyond the server,
and a screenshot shows the charts' series colours."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
import zlib

import numpy as np
import pytest

from edgellm import telemetry as wire
from server import rollout
from server.http import HttpServer
from server.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium); CI installs it"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1280,1100",
    "--virtual-time-budget=8000",
]


def read_png(data: bytes) -> np.ndarray:
    """Minimal PNG decoder (8-bit RGB/RGBA, non-interlaced) -> HxWx3 uint8."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and ctype in (2, 6) and interlace == 0
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), dtype=np.int32)
    prev = np.zeros(w * bpp, dtype=np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            cur = line
        elif f == 1:
            cur = line.copy()
            for x in range(bpp, w * bpp):
                cur[x] = (cur[x] + cur[x - bpp]) & 255
        elif f == 2:
            cur = (line + prev) & 255
        elif f == 3:
            cur = line.copy()
            for x in range(w * bpp):
                left = cur[x - bpp] if x >= bpp else 0
                cur[x] = (cur[x] + ((left + prev[x]) >> 1)) & 255
        else:
            cur = line.copy()
            for x in range(w * bpp):
                a = cur[x - bpp] if x >= bpp else 0
                b, c = prev[x], prev[x - bpp] if x >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                cur[x] = (cur[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out[y], prev = cur, cur
    return out.reshape(h, w, bpp)[:, :, :3].astype(np.uint8)


def has_colour(img: np.ndarray, hex_rgb: str, tol: int = 12) -> int:
    rgb = np.array([int(hex_rgb[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img.astype(int) - rgb).max(axis=2) <= tol).sum())


@pytest.fixture
def populated(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    now = time.time()
    envs = []
    for i, dev in enumerate(["cam-01", "cam-02", "arm-01"]):
        envs.append(
            wire.Envelope(
                device=dev,
                kind="birth",
                seq=0,
                ts=now - 600,
                body={
                    "session": "s",
                    "profile": "rpi5-8gb" if i < 2 else "jetson-orin-nano",
                    "group": "lab",
                    "version": "1.0",
                    "model": "demo",
                    "health": "ok",
                    "slot": "a",
                },
            )
        )
        for k in range(12):
            version = "1.0" if k < 6 or i else "2.0-bad"
            envs.append(
                wire.Envelope(
                    device=dev,
                    kind="metrics",
                    seq=k + 1,
                    ts=now - 600 + k * 40,
                    body={
                        "interval_s": 40,
                        "count": 50,
                        "errors": 1 if version == "2.0-bad" else 0,
                        "p50_latency_ms": 80.0 + i * 5,
                        "p95_latency_ms": 900.0 if version == "2.0-bad" else 120.0 + i * 10,
                        "tokens_per_second": 30.0 if version == "2.0-bad" else 45.0 + i,
                        "version": version,
                        "mean_logprob": -3.2 if version == "2.0-bad" else -1.2,
                    },
                )
            )
    for j, e in enumerate(envs):  # spread over time so charts have several points
        store.ingest([e], received=now - 600 + (j % 13) * 40)
    store.ingest([wire.Envelope(device="arm-01", kind="death", seq=0, ts=now, body={"session": "s"})])
    rid = rollout.start(
        store, model="demo", version="2.0-bad", group="lab", canary="34%", gate="p95_latency_ms<=300", bake="10m"
    )
    store.set_rollout_state(
        rid,
        rollout.RolloutState.ROLLED_BACK,
        reason="gate broken on canary (n=300): p95_latency_ms=900 breaks p95_latency_ms<=300",
    )
    rollout.log(store, rid, "rolled_back", "canary devices are back on their previous version")
    srv = HttpServer(store, None, port=0)
    srv.start()
    yield srv, rid
    srv.stop()


def test_dashboard_renders_fleet_rollouts_and_charts(tmp_path, populated):
    srv, rid = populated
    profile = tmp_path / "chromium-profile"
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", srv.url + "/"],
        capture_output=True,
        text=True,
        timeout=90,
    ).stdout
    assert 'data-ready="1"' in dom, dom[-2000:]
    for dev in ("cam-01", "cam-02", "arm-01"):
        assert f'data-device="{dev}"' in dom
    assert f'data-rollout="{rid}"' in dom and "rolled_back" in dom and "p95_latency_ms=900" in dom
    assert dom.count("<polyline") >= 8  # 4 metrics x (per version + per device)
    assert "2.0-bad" in dom and ">no data yet</text>" not in dom

    shot = tmp_path / "dashboard.png"
    subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", srv.url + "/"],
        capture_output=True,
        timeout=90,
        check=True,
    )
    if os.environ.get("EDGELLM_DASHBOARD_SHOT"):  # keep the screenshot to look at it
        shutil.copy(shot, os.environ["EDGELLM_DASHBOARD_SHOT"])
    img = read_png(shot.read_bytes())
    assert img.shape[:2] == (1100, 1280)
    assert has_colour(img[:60], "#1d2330") > 10_000  # the header bar
    assert has_colour(img, "#3b6fd8") > 200  # first series (blue) lines
    assert has_colour(img, "#d64545") > 200  # second series (red) + rolled-back state
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 50  # text and charts, not a blank page

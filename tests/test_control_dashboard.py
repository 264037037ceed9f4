"""The dashboard's rollout buttons in headless Chromium: an operator token shows pause, abort and
rollback on an active rollout; a viewer token and no token show none."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from edgellm import telemetry as wire
from server import auth, rollout
from server.api import ApiContext
from server.app import DataDir
from server.http import HttpServer

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
    "--virtual-time-budget=8000",
]


def test_buttons_follow_the_role(tmp_path):
    data = DataDir.init(tmp_path / "srv")
    store = data.store()
    store.ingest(
        [wire.Envelope(device="cam-01", kind="birth", seq=0, ts=time.time(), body={"session": "s", "group": "lab"})]
    )
    rid = rollout.start(store, model="demo", version="2.0", group="lab", no_gate=True)
    store.set_rollout_state(rid, rollout.RolloutState.CANARY)
    tokens = {r: auth.create_token(store, name=f"{r}-t", role=r)[1] for r in ("viewer", "operator")}
    srv = HttpServer(store, data.repo, port=0, api=ApiContext(data, store))
    srv.start()
    try:

        def dom(fragment: str) -> str:
            out = subprocess.run(
                [
                    CHROMIUM,
                    *FLAGS,
                    f"--user-data-dir={tmp_path / fragment[:12]}",
                    "--dump-dom",
                    srv.url + "/" + fragment,
                ],
                capture_output=True,
                text=True,
                timeout=90,
            ).stdout
            assert 'data-ready="1"' in out and f'data-rollout="{rid}"' in out, out[-2000:]
            return out

        op = dom(f"#token={tokens['operator']}")
        assert all(f'data-action="{a}"' in op for a in ("pause", "abort", "rollback"))
        assert 'data-action="resume"' not in op and "operator-t (operator)" in op
        viewer = dom(f"#token={tokens['viewer']}")
        assert "data-action=" not in viewer and "viewer-t (viewer)" in viewer
        assert "data-action=" not in dom("")
    finally:
        srv.stop()

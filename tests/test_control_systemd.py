"""The systemd units shown in docs/server.md: hardened (dedicated user, read-only system, no new
privileges) and accepted by `systemd-analyze verify` when it is available."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "docs" / "systemd"
NAMES = ("edgellm-server.service", "edgellm-agent.service")


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


@pytest.mark.parametrize("name", NAMES)
def test_unit_is_hardened(name):
    d = directives((UNITS / name).read_text())
    assert d["User"] == ["edgellm"] and d["NoNewPrivileges"] == ["yes"] and d["ProtectSystem"] == ["strict"]
    assert d["CapabilityBoundingSet"] == [""] and d["ProtectHome"] == ["yes"] and d["PrivateTmp"] == ["yes"]
    assert d["ExecStart"][0].split()[0].endswith(name.removesuffix(".service"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path):
    stub = tmp_path / "bin"
    stub.mkdir()
    for name in NAMES:
        exe = stub / name.removesuffix(".service")
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
        text = (UNITS / name).read_text().replace("/usr/local/bin/", f"{stub}/")
        (tmp_path / name).write_text(text)
    r = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in NAMES)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "edgellm-" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr

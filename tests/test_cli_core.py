"""The operator's path through the CLI: keys -> repo -> pack -> add -> verify (and refusals)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from fixtures_trust import make_bundle_dir

from edgellm.cli import main


def run(*args: str, ok: bool = True):
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def test_operator_flow_and_refusals(tmp_path: Path) -> None:
    keys, repo, signed = tmp_path / "keys", tmp_path / "repo", tmp_path / "signed"
    run("keys", "init", str(keys), "--threshold", "targets=2", "--count", "targets=3")
    assert (keys / "root.json").is_file()
    assert (keys / "targets-1.pem").stat().st_mode & 0o777 == 0o600
    run("repo", "init", str(repo), "--keys", str(keys))
    src = make_bundle_dir(tmp_path / "src")
    b = tmp_path / "demo-1.0.0.bundle"
    packed = json.loads(run("bundle", "pack", str(src), "--out", str(b), "--format", "json").output)
    assert len(packed["sha256"]) == 64
    info = json.loads(run("bundle", "inspect", str(b), "--format", "json").output)
    assert info["manifest"]["name"] == "demo" and info["sha256"] == packed["sha256"]
    run("repo", "add", str(repo), str(b), "--keys", str(keys), "--export", str(signed))
    listed = json.loads(run("repo", "list", str(repo), "--format", "json").output)
    assert listed[0]["custom"]["edgellm"]["version"] == "1.0.0"

    ok = json.loads(
        run(
            "bundle", "verify", str(b), "--root", str(keys / "root.json"), "--repo", str(repo), "--format", "json"
        ).output
    )
    assert ok["verified"] and ok["edgellm"]["name"] == "demo"
    run("bundle", "verify", str(signed / "demo-1.0.0.bundle.signed"), "--root", str(keys / "root.json"))

    # tampered copy: refused, non-zero, with a reason and a next step
    bad = tmp_path / "bad" / b.name
    bad.parent.mkdir()
    data = bytearray(b.read_bytes())
    data[-5000] ^= 0x40
    bad.write_bytes(bytes(data))
    r = run("bundle", "verify", str(bad), "--root", str(keys / "root.json"), "--repo", str(repo), ok=False)
    assert r.exit_code == 1
    assert "hash" in r.output and "hint" in r.output

    # a plain bundle without --repo cannot be verified offline
    r = run("bundle", "verify", str(b), "--root", str(keys / "root.json"), ok=False)
    assert r.exit_code == 1 and "signed" in r.output

    run("repo", "rotate-key", str(repo), "--keys", str(keys), "--role", "targets")
    run("bundle", "verify", str(b), "--root", str(keys / "root.json"), "--repo", str(repo))


def test_bad_threshold_spec_is_a_usage_error(tmp_path: Path) -> None:
    r = run("keys", "init", str(tmp_path / "k"), "--threshold", "targets", ok=False)
    assert r.exit_code == 2 and "ROLE=N" in r.output

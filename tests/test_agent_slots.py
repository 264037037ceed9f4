"""A/B slot pointer, trial boot counter, integrity checks and install policy (fast; no model).

Slots hold real packed-and-unpacked bundles with a fake artifact; the health check is stubbed
here only — the real child-process check runs in test_agent_e2e / test_agent_crash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_trust import make_bundle_dir

from agent.schemas import UpdateRequest


@pytest.fixture
def archives(tmp_path) -> dict[str, Path]:
    from edgellm.bundle import pack

    out = {}
    for v in ("1.0.0", "1.1.0", "1.9.0", "1.10.0"):
        src = make_bundle_dir(tmp_path / f"src-{v}", version=v, extra={"profiles": ["rpi4-4gb"]})
        out[v] = pack(src, tmp_path / f"demo-{v}.bundle").path
    return out


@pytest.fixture
def installer(tmp_path):
    from agent.config import AgentConfig, AgentPaths
    from agent.install import Installer

    paths = AgentPaths(tmp_path / "agent")
    paths.ensure_dirs()
    cfg = AgentConfig(device_id="dev-1", profile="rpi4-4gb")
    reports: list[dict] = []

    def health(slot_dir, budget, timeout):  # stub: the artifact is not a real model
        return reports.pop(0) if reports else {"ok": True, "tokens_per_second": 100.0}

    inst = Installer(paths, cfg, health_runner=health, profile=object())
    inst.reports = reports
    return inst


def _install(inst, archive, **kw):
    with inst.lock():
        return inst._install_verified(archive, None, source="test", **kw)


def test_install_switches_atomically_and_keeps_the_previous_slot(installer, archives):
    _install(installer, archives["1.0.0"])
    _install(installer, archives["1.1.0"])
    st = installer.store.load()
    assert (st.current, st.current_record.version) == ("B", "1.1.0")
    assert st.previous == "A" and st.slots["A"].version == "1.0.0"
    assert st.trial is not None and st.trial.previous == "A"
    raw = json.loads(installer.paths.state.read_text())
    assert raw["current"] == "B" and raw["format"] == 1
    assert not installer.paths.staging.exists()


def test_policy_refuses_downgrade_same_version_and_rejected(installer, archives):
    from agent.errors import HealthCheckFailed, UpdateRefused

    _install(installer, archives["1.9.0"])
    with pytest.raises(UpdateRefused, match="older"):
        _install(installer, archives["1.1.0"])
    with pytest.raises(UpdateRefused, match="already current"):  # AlreadyCurrent: `install` exits 0 on it
        _install(installer, archives["1.9.0"])
    _install(installer, archives["1.10.0"])  # 1.10 > 1.9: numeric, not string order
    installer.reports.append({"ok": False, "reason": "golden prompt failed"})
    with pytest.raises(HealthCheckFailed):
        _install(installer, archives["1.1.0"], allow_downgrade=True)
    st = installer.store.load()
    assert st.current_record.version == "1.10.0"
    assert "1.1.0" in st.rejected and not st.last_result["ok"]
    assert "golden prompt failed" in st.last_result["reason"]
    with pytest.raises(UpdateRefused, match="rejected"):
        _install(installer, archives["1.1.0"], allow_downgrade=True)
    _install(installer, archives["1.1.0"], allow_downgrade=True, force=True)
    assert installer.store.load().current_record.version == "1.1.0"


def test_failed_health_check_never_becomes_current(installer, archives):
    from agent.errors import HealthCheckFailed

    _install(installer, archives["1.0.0"])
    installer.reports.append({"ok": False, "reason": "health check process was killed by SIGABRT"})
    with pytest.raises(HealthCheckFailed, match="SIGABRT"):
        _install(installer, archives["1.1.0"])
    st = installer.store.load()
    assert st.current == "A" and st.current_record.version == "1.0.0" and "B" not in st.slots
    assert not installer.store.slot_dir("B").exists()


def test_trial_reverts_after_too_many_boots_without_commit(installer, archives):
    _install(installer, archives["1.0.0"])
    installer.store.commit_trial()
    _install(installer, archives["1.1.0"])
    for n in (1, 2, 3):
        st = installer.store.boot(max_boots=3)
        assert (st.current, st.trial.boots) == ("B", n)
    st = installer.store.boot(max_boots=3)
    assert st.current == "A" and st.trial is None
    assert st.last_result["action"] == "revert" and "1.1.0" in st.rejected


def test_committed_trial_stops_counting(installer, archives):
    _install(installer, archives["1.0.0"])
    installer.store.commit_trial()
    _install(installer, archives["1.1.0"])
    installer.store.boot(max_boots=1)
    installer.store.commit_trial()
    for _ in range(5):
        st = installer.store.boot(max_boots=1)
    assert st.current == "B" and st.trial is None


def test_boot_falls_back_when_the_current_slot_is_damaged(installer, archives):
    _install(installer, archives["1.0.0"])
    _install(installer, archives["1.1.0"])
    art = installer.store.slot_dir("B") / "model.gguf"
    art.write_bytes(art.read_bytes()[:-1] + b"\0")
    st = installer.store.boot(max_boots=3)
    assert st.current == "A" and st.current_record.version == "1.0.0"
    assert "failed verification" in st.last_result["reason"]
    (installer.store.slot_dir("A") / "manifest.json").write_text("{}")
    st = installer.store.boot(max_boots=3)
    assert st.current is None and st.last_result["ok"] is False


def test_rollback_needs_a_previous_slot(installer, archives):
    from agent.errors import NoRollbackTarget

    _install(installer, archives["1.0.0"])
    with pytest.raises(NoRollbackTarget):
        installer.rollback()
    _install(installer, archives["1.1.0"])
    res = installer.rollback()
    assert res["action"] == "rollback" and res["version"] == "1.0.0"
    assert installer.store.load().current == "A"


def test_select_target_for_profile_and_desired_version(installer):
    from agent.slots import AgentState
    from agent.source import TargetInfo

    t = lambda v, prof="rpi4-4gb", name="demo": TargetInfo(f"{name}-{v}", name, v, profiles=[prof])  # noqa: E731
    targets = [t("1.0.0"), t("1.2.0"), t("1.10.0", prof="rpi5-8gb"), t("1.9.0"), t("2.0.0", name="other")]
    st = AgentState()
    assert installer.select_target(targets, st, UpdateRequest(**{"model": "demo"})).version == "1.9.0"
    assert (
        installer.select_target(targets, st, UpdateRequest(**{"model": "demo", "version": "1.2.0"})).version == "1.2.0"
    )
    st.rejected.append("1.9.0")
    assert installer.select_target(targets, st, UpdateRequest(**{"model": "demo"})).version == "1.2.0"
    assert installer.select_target(targets, st, UpdateRequest(**{"model": "demo", "version": "3.0"})) is None


def test_agent_imports_and_runs_with_torch_unimportable():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import agent, agent.cli, agent.daemon, agent.api, agent.install, agent.health, agent.engine\n"
        "import agent.source, agent.slots, agent.provision, edgellm.client\n"
        "from click.testing import CliRunner\n"
        "r = CliRunner().invoke(agent.cli.main, ['--help'])\n"
        "assert r.exit_code == 0 and 'provision' in r.output\n"
        "bad = [m for m in sys.modules if m == 'torch' and sys.modules[m] is not None or m.startswith('edgellm.pipeline')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


class FakeSource:
    """An UpdateSource serving local archives (the real TUF source runs in test_agent_e2e)."""

    def __init__(self, archives: dict, profile: str = "rpi4-4gb") -> None:
        from agent.source import TargetInfo

        self.archives = archives
        self.infos = [TargetInfo(p.name, "demo", v, profiles=[profile]) for v, p in archives.items()]
        self.downloads: list[str] = []

    def refresh(self) -> None:
        pass

    def targets(self):
        return list(self.infos)

    def download(self, target, dest_dir):
        self.downloads.append(target.version)
        dst = dest_dir / target.path
        dst.write_bytes(self.archives[target.version].read_bytes())
        return dst


def test_update_never_downgrades_unless_asked(installer, archives):
    src = FakeSource(archives)
    res = installer.update(src, UpdateRequest())
    assert res["ok"] and installer.store.load().current_record.version == "1.10.0"
    assert installer.update(src, UpdateRequest())["reason"] == "up to date"
    res = installer.update(src, UpdateRequest(**{"version": "1.1.0"}))
    assert not res["ok"] and "older" in res["reason"]
    assert installer.store.load().current_record.version == "1.10.0" and src.downloads == ["1.10.0"]
    res = installer.update(src, UpdateRequest(**{"version": "1.1.0", "rollback": True}))
    assert res["ok"] and installer.store.load().current_record.version == "1.1.0"
    res = installer.update(
        src, UpdateRequest(**{"version": "1.10.0"})
    )  # an upgrade again: downloaded and verified again
    assert res["ok"] and installer.store.load().current_record.version == "1.10.0"
    # asking for the older version held in the other slot rolls back locally, without a download
    res = installer.update(src, UpdateRequest(**{"version": "1.1.0"}))
    assert res["ok"] and res["action"] == "rollback"
    assert installer.store.load().current_record.version == "1.1.0"
    assert src.downloads == ["1.10.0", "1.1.0", "1.10.0"]


def test_daemon_reverts_when_the_new_slot_passed_its_check_but_fails_to_load(installer, archives, monkeypatch):
    """The health check ran in a child; if the daemon itself then cannot load the slot, it goes
    back to the previous one by itself and reports it (a rolled-back version is not retried)."""
    from agent import daemon as daemon_mod
    from agent.engine import Engine, ModelHandle

    _install(installer, archives["1.0.0"])
    _install(installer, archives["1.1.0"])
    assert installer.store.load().current == "B"

    class Stub:  # stands for the runtime of slot A; slot B's load fails below
        context_length = 256

        def close(self) -> None:
            pass

    def fake_load(paths, slot, *, threads):
        if slot == "B":
            raise RuntimeError("llama.cpp could not load model.gguf")
        return ModelHandle(runtime=Stub(), name="demo", version="1.0.0", slot=slot, kind="gguf")

    monkeypatch.setattr(daemon_mod, "load_handle", fake_load)
    d = daemon_mod.Daemon(installer.paths, installer.config)
    events: list[tuple[str, dict]] = []
    d._event = lambda kind, **f: events.append((kind, f))
    d.engine = Engine(queue_size=2)
    d.reconcile()

    st = installer.store.load()
    assert st.current == "A" and st.current_record.version == "1.0.0"
    assert d.engine.model is not None and d.engine.model.version == "1.0.0"
    assert "failed to load" in st.last_result["reason"]
    assert st.rejected == ["1.1.0"]  # not installed again unless forced
    assert [k for k, _ in events] == ["update.rolled_back"]
    d.reconcile()  # nothing retried, nothing flaps
    assert installer.store.load().current == "A" and len(events) == 1

"""Assignments signed by the director role (a delegation of the targets role), verified by the
device with python-tuf's ngclient against its pinned root: a repository made before the
director existed is upgraded, a forged or replayed assignment is refused."""

from __future__ import annotations

import shutil

import pytest
from tuf.api.metadata import Metadata

from edgellm.errors import VerificationError
from edgellm.trust import KeyStore, Repository, TufClient
from edgellm.trust.director import (
    DIRECTOR,
    Assignment,
    ensure_director,
    fetch_assignment,
    new_assignment,
    read_assignments,
    write_assignments,
)


def _client(tmp_path, root, repo_dir, name="cache"):
    c = TufClient(tmp_path / name, root, repo_dir / "metadata", repo_dir / "targets")
    c.refresh()
    return c


def _assign(repo, scope, subject, version):
    a = new_assignment(scope, subject, model="demo", version=version, targets=["demo.bundle"])
    return write_assignments(repo, [(scope, subject, a)])


def test_an_old_repository_is_upgraded_and_its_devices_read_their_assignment(tmp_path, signed_repo):
    repo, root, name = signed_repo
    before = _client(tmp_path, root, repo.dir, "old-device")  # a device that trusted it before the upgrade
    assert ensure_director(repo) is True
    assert ensure_director(repo) is False  # idempotent
    _assign(repo, "group", "lab", "1.0.0")
    # the published bundle is still there, re-signed targets carry the delegation
    assert [t.name for t in repo.list_targets()] == [name]
    before.refresh()
    a = fetch_assignment(before, "group", "lab", tmp_path / "dl")
    assert (a.model, a.version, a.serial, a.targets) == ("demo", "1.0.0", 2, ("demo.bundle",))
    assert fetch_assignment(before, "device", "dev-9", tmp_path / "dl") is None
    assert read_assignments(repo)["assignments/group/lab.json"].version == "1.0.0"


def test_device_assignment_removed_leaves_the_group_one(tmp_path, signed_repo):
    repo, root, _ = signed_repo
    ensure_director(repo)
    g = _assign(repo, "group", "lab", "1.0.0")
    _assign(repo, "device", "dev-1", "2.0.0")
    c = _client(tmp_path, root, repo.dir)
    assert fetch_assignment(c, "device", "dev-1", tmp_path / "dl").version == "2.0.0"
    write_assignments(repo, [("device", "dev-1", None)])
    c.refresh()
    assert fetch_assignment(c, "device", "dev-1", tmp_path / "dl") is None
    assert fetch_assignment(c, "group", "lab", tmp_path / "dl").serial == g


def test_assignment_signed_by_a_key_the_root_does_not_trust_is_refused(tmp_path, signed_repo):
    repo, root, _ = signed_repo
    ensure_director(repo)
    _assign(repo, "group", "lab", "1.0.0")
    c = _client(tmp_path, root, repo.dir)
    assert fetch_assignment(c, "group", "lab", tmp_path / "dl").version == "1.0.0"
    # an attacker with the server's disk but not its director key re-signs a newer director version
    _forge(repo, tmp_path / "forged-keys")
    with pytest.raises(VerificationError, match="not enough valid signatures"):
        c.refresh()
        fetch_assignment(c, "group", "lab", tmp_path / "dl")


def _forge(real: Repository, forged_keys) -> None:
    """Write a director version signed by a director key the root does not chain to (the
    server's other keys copied, the director's replaced), bypassing the server's own check."""
    from edgellm.trust import director as d

    shutil.copytree(real.keys.dir, forged_keys)
    ks = KeyStore(forged_keys)
    ks.index["roles"][DIRECTOR] = []
    ks.save()
    ks.add_key(DIRECTOR)
    repo = Repository(real.dir, forged_keys)
    a = Assignment("group", "lab", 99, "demo", "6.6.6-evil")
    orig = d.has_director
    d.has_director = lambda r: True
    try:
        write_assignments(repo, [("group", "lab", a)])
    finally:
        d.has_director = orig


def test_replayed_older_director_metadata_is_refused(tmp_path, signed_repo):
    repo, root, _ = signed_repo
    ensure_director(repo)
    _assign(repo, "group", "lab", "1.0.0")
    md = repo.dir / "metadata"
    saved = {f.name: f.read_bytes() for f in md.iterdir()}
    _assign(repo, "group", "lab", "2.0.0")
    c = _client(tmp_path, root, repo.dir)
    assert fetch_assignment(c, "group", "lab", tmp_path / "dl").version == "2.0.0"
    # the attacker serves yesterday's metadata (timestamp, snapshot, director: all validly signed)
    for f in md.iterdir():
        if f.name not in saved:
            f.unlink()
    for n, data in saved.items():
        (md / n).write_bytes(data)
    with pytest.raises(VerificationError, match="backwards|does not match"):
        _client(tmp_path, root, repo.dir)  # the same cache: it remembers the newer versions


def test_old_director_version_under_the_current_snapshot_is_refused(tmp_path, signed_repo):
    repo, root, _ = signed_repo
    ensure_director(repo)
    _assign(repo, "group", "lab", "1.0.0")
    old_director = (repo.dir / "metadata" / "1.director.json").read_bytes()
    _assign(repo, "group", "lab", "2.0.0")
    v = Metadata.from_bytes((repo.dir / "metadata" / f"{DIRECTOR}.json").read_bytes()).signed.version
    # the server's consistent-snapshot file for the current version now holds the old content
    (repo.dir / "metadata" / f"{v}.{DIRECTOR}.json").write_bytes(old_director)
    c = TufClient(tmp_path / "fresh", root, repo.dir / "metadata", repo.dir / "targets")
    c.refresh()
    with pytest.raises(VerificationError):
        fetch_assignment(c, "group", "lab", tmp_path / "dl")


@pytest.mark.parametrize(
    "bad",
    [
        b"[]",
        b'{"format":"x"}',
        b'{"format":"edgellm-assignment","v":1,"scope":"group","subject":"lab","serial":0}',
        b'{"format":"edgellm-assignment","v":1,"scope":"group","subject":"lab","serial":1,"model":"m"}',
        b'{"format":"edgellm-assignment","v":1,"scope":"group","subject":"../x","serial":1}',
        b'{"format":"edgellm-assignment","v":1,"scope":"group","subject":"lab","serial":1,"targets":["a/b"]}',
        b"x" * 20000,
    ],
)
def test_malformed_assignment_bytes_are_refused(bad):
    with pytest.raises(VerificationError):
        Assignment.from_bytes(bad)


def test_assignment_roundtrip():
    a = new_assignment("device", "dev-1", model="m", version="1.0", rollout="r-1", group="lab")
    assert Assignment.from_bytes(a.to_json()) == a


def test_the_agent_refuses_a_forged_assignment_and_a_lower_serial(tmp_path, signed_repo):
    """agent.assignment.current (what the daemon, the CLI and MQTT nudges all use): a forged
    director version is an InstallError recorded as the device's update error; a serial lower
    than one applied before is refused as a replay."""
    import json

    from agent.assignment import current, request_for
    from agent.config import AgentConfig, AgentPaths
    from agent.errors import InstallError
    from agent.source import TufSource

    repo, root, _ = signed_repo
    ensure_director(repo)
    _assign(repo, "group", "lab", "1.0.0")
    paths = AgentPaths(tmp_path / "agent")
    paths.ensure_dirs()
    cfg = AgentConfig(device_id="dev-1", profile="rpi5-8gb", server=str(repo.dir), group="lab")
    cfg.save(paths)
    source = TufSource(str(repo.dir), root, paths.tuf_cache)
    a = current(paths, cfg, source)
    assert request_for(a).version == "1.0.0" and request_for(a).rollback is True  # assigned: older is fine
    seen = json.loads((paths.root / "assignment.json").read_text())
    (paths.root / "assignment.json").write_text(json.dumps({k: v + 100 for k, v in seen.items()}))
    with pytest.raises(InstallError, match="older than .* applied before"):
        current(paths, cfg, TufSource(str(repo.dir), root, paths.tuf_cache))
    _forge(repo, tmp_path / "forged-keys")
    with pytest.raises(InstallError, match="assignment refused: .*not enough valid signatures") as e:
        current(paths, cfg, TufSource(str(repo.dir), root, paths.tuf_cache))
    assert e.value.hint


def test_a_device_assignment_can_move_the_device_to_another_group(tmp_path, signed_repo):
    from agent.assignment import current
    from agent.config import AgentConfig, AgentPaths
    from agent.source import TufSource

    repo, root, _ = signed_repo
    ensure_director(repo)
    _assign(repo, "group", "field", "2.0.0")
    write_assignments(
        repo, [("device", "dev-1", new_assignment("device", "dev-1", model=None, version=None, group="field"))]
    )
    paths = AgentPaths(tmp_path / "agent")
    paths.ensure_dirs()
    cfg = AgentConfig(device_id="dev-1", profile="rpi5-8gb", server=str(repo.dir), group="lab")
    cfg.save(paths)
    moved: list[str] = []
    a = current(paths, cfg, TufSource(str(repo.dir), root, paths.tuf_cache), on_group=moved.append)
    assert (a.scope, a.subject, a.version) == ("group", "field", "2.0.0") and moved == ["field"]
    assert AgentConfig.load(paths).group == "field"


def test_assignment_with_adapters_is_v2_without_is_the_v1_old_agents_read():
    from edgellm.trust.director import AssignedAdapter

    plain = new_assignment("group", "lab", model="tiny", version="1.0.0", targets=["tiny.bundle"])
    assert plain.to_dict()["v"] == 1 and "adapters" not in plain.to_dict()
    layered = new_assignment(
        "device",
        "dev-1",
        model="tiny",
        version="1.0.0",
        targets=["tiny.bundle"],
        adapters=[AssignedAdapter("federated", "1.1.0", ("federated-1.1.0.bundle",))],
    )
    assert layered.to_dict()["v"] == 2
    assert Assignment.from_bytes(layered.to_json()) == layered


@pytest.mark.parametrize(
    "change",
    [
        {"v": 1},  # adapters in a v1 assignment
        {"model": None, "version": None},  # adapters without a base
        {"adapters": [{"name": "k", "version": "1", "targets": []}] * 2},  # the same adapter twice
        {"adapters": [{"name": "k", "version": "1", "targets": [], "base": "x"}]},  # unknown adapter field
        {"adapters": {"name": "k"}},
        {"adapters": [{"name": "k", "version": "1", "targets": ["t"] * 17}]},
    ],
)
def test_malformed_adapters_in_an_assignment_are_refused(change):
    import json

    d = {
        "format": "edgellm-assignment",
        "v": 2,
        "scope": "device",
        "subject": "dev-1",
        "serial": 3,
        "model": "tiny",
        "version": "1.0.0",
        "targets": ["tiny.bundle"],
        "adapters": [{"name": "k", "version": "1", "targets": ["k.bundle"]}],
    }
    Assignment.from_bytes(json.dumps(d).encode())  # the unchanged one is fine
    with pytest.raises(VerificationError, match="assignment refused"):
        Assignment.from_bytes(json.dumps({**d, **change}).encode())

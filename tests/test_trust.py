"""TUF trust chain: real python-tuf metadata, real ngclient verification, real files."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import dataclasses
import pytest

from edgellm.errors import TrustError, VerificationError
from edgellm.trust import Repository, TufClient, init_keys, verify_bundle_file, verify_signed_bundle
from fixtures_trust import make_bundle_dir


def _client(repo: Repository, root: Path, cache: Path) -> TufClient:
    return TufClient(cache, root, repo.metadata_dir, repo.targets_dir)


def _snapshot_cache(cache: Path) -> dict[str, bytes]:
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*.json")) if p.is_file()}


def _publish(tmp_path: Path, repo: Repository, version: str) -> Path:
    from edgellm.bundle import pack

    src = make_bundle_dir(tmp_path / f"src-{version}", version=version)
    b = pack(src, tmp_path / f"demo-{version}.bundle").path
    repo.add_bundle(b)
    return b


def test_published_bundle_verifies_with_custom_ml_facts(signed_repo, packed_bundle: Path) -> None:
    repo, root, name = signed_repo
    vt = verify_bundle_file(packed_bundle, root, repo.dir)
    assert vt.name == name
    facts = vt.edgellm
    assert facts["name"] == "demo" and facts["version"] == "1.0.0"
    assert facts["runtime"] == "gguf" and facts["quantization"] == "q8_0"
    assert facts["profiles"] == ["rpi5-8gb"] and float(facts["metrics"]["perplexity"]) == 3.2


def test_altered_bytes_refused(tmp_path: Path, signed_repo, packed_bundle: Path) -> None:
    repo, root, name = signed_repo
    data = bytearray(packed_bundle.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = tmp_path / "bad" / name
    bad.parent.mkdir()
    bad.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="hash"):
        verify_bundle_file(bad, root, repo.dir)


def test_length_differs_refused(tmp_path: Path, signed_repo, packed_bundle: Path) -> None:
    repo, root, name = signed_repo
    longer = tmp_path / "long" / name
    longer.parent.mkdir()
    longer.write_bytes(packed_bundle.read_bytes() + b"\0")
    with pytest.raises(VerificationError, match="length"):
        verify_bundle_file(longer, root, repo.dir)


def test_bundle_absent_from_targets_refused(tmp_path: Path, signed_repo) -> None:
    from edgellm.bundle import pack

    repo, root, _ = signed_repo
    other = pack(make_bundle_dir(tmp_path / "o", name="other"), tmp_path / "other-1.bundle").path
    with pytest.raises(VerificationError, match="not in the signed targets"):
        verify_bundle_file(other, root, repo.dir)


def test_download_is_verified(tmp_path: Path, signed_repo, packed_bundle: Path) -> None:
    repo, root, name = signed_repo
    client = _client(repo, root, tmp_path / "cache")
    client.refresh()
    assert [t.name for t in client.targets()] == [name]
    vt = client.download(name, tmp_path / "dl")
    assert vt.path.read_bytes() == packed_bundle.read_bytes()
    # the stored target is tampered with on the server: the download is refused
    stored = repo.target_path(name)
    stored.write_bytes(stored.read_bytes()[:-1] + b"X")
    client2 = _client(repo, root, tmp_path / "cache2")
    with pytest.raises(VerificationError):
        client2.download(name, tmp_path / "dl2")


def test_rollback_to_older_metadata_refused_and_state_kept(tmp_path: Path, signed_repo) -> None:
    repo, root, _ = signed_repo
    old_ts = (repo.metadata_dir / "timestamp.json").read_bytes()
    _publish(tmp_path, repo, "2.0.0")
    cache = tmp_path / "cache"
    client = _client(repo, root, cache)
    client.refresh()
    assert {t.custom["edgellm"]["version"] for t in client.targets()} == {"1.0.0", "2.0.0"}
    before = _snapshot_cache(cache)
    (repo.metadata_dir / "timestamp.json").write_bytes(old_ts)  # attacker replays old metadata
    with pytest.raises(VerificationError, match="backwards|version"):
        _client(repo, root, cache).refresh()
    assert _snapshot_cache(cache) == before


def test_expired_timestamp_refused(tmp_path: Path, signed_repo) -> None:
    repo, root, _ = signed_repo
    cache = tmp_path / "cache"
    _client(repo, root, cache).refresh()
    before = _snapshot_cache(cache)
    repo.expiry = dataclasses.replace(repo.expiry, timestamp=timedelta(seconds=-60))
    repo.refresh_timestamp()
    with pytest.raises(VerificationError, match="expired"):
        _client(repo, root, cache).refresh()
    assert _snapshot_cache(cache) == before


@pytest.mark.parametrize("swap", ["snapshot", "targets"])
def test_snapshot_targets_mix_and_match_refused(tmp_path: Path, signed_repo, swap: str) -> None:
    repo, root, _ = signed_repo
    _publish(tmp_path, repo, "2.0.0")
    v = json.loads((repo.metadata_dir / f"{swap}.json").read_text())["signed"]["version"]
    # serve the previous version's (validly signed) file under the current version's name
    shutil.copyfile(repo.metadata_dir / f"{v - 1}.{swap}.json", repo.metadata_dir / f"{v}.{swap}.json")
    with pytest.raises(VerificationError):
        _client(repo, root, tmp_path / "cache").refresh()


def _resign_targets(repo: Repository, n_keys: int) -> None:
    signers = repo.keys.signers("targets")[:n_keys]
    repo.commit_targets(repo.load("targets"), signers=signers)


def test_signature_threshold_two_of_three_passes(tmp_path: Path, signed_repo, packed_bundle: Path) -> None:
    repo, root, _ = signed_repo
    _resign_targets(repo, 2)
    assert len(repo.load("targets").signatures) == 2
    verify_bundle_file(packed_bundle, root, repo.dir)


def test_signature_threshold_one_of_three_refused_state_kept(tmp_path: Path, signed_repo, packed_bundle: Path) -> None:
    repo, root, name = signed_repo
    cache = tmp_path / "cache"
    _client(repo, root, cache).refresh()
    before = _snapshot_cache(cache)
    _resign_targets(repo, 1)
    with pytest.raises(VerificationError, match="signatures"):
        _client(repo, root, cache).refresh()
    # The (validly signed) new timestamp/snapshot may be cached, as TUF specifies; the trusted
    # targets -- what a device may install -- and the trusted root are untouched.
    after = _snapshot_cache(cache)
    assert after["targets.json"] == before["targets.json"]
    assert after["root.json"] == before["root.json"]


def test_metadata_signed_by_unknown_key_refused(tmp_path: Path, signed_repo, packed_bundle: Path) -> None:
    repo, root, _ = signed_repo
    init_keys(tmp_path / "rogue")
    from edgellm.trust import KeyStore

    rogue = KeyStore(tmp_path / "rogue").signers("targets")
    repo.commit_targets(repo.load("targets"), signers=rogue)
    with pytest.raises(VerificationError, match="signatures"):
        verify_bundle_file(packed_bundle, root, repo.dir)


def test_key_rotation_followed_by_devices_pinning_old_root(tmp_path: Path, signed_repo, packed_bundle: Path) -> None:
    repo, root, _ = signed_repo
    pinned = root.read_bytes()  # what devices were provisioned with
    for role in ("targets", "snapshot", "timestamp", "root"):
        repo.rotate_key(role)
    vt = verify_bundle_file(packed_bundle, pinned, repo.dir)
    assert vt.edgellm["version"] == "1.0.0"
    assert json.loads((repo.metadata_dir / "root.json").read_text())["signed"]["version"] == 5


def test_signed_bundle_installs_offline_and_detects_tampering(tmp_path: Path, signed_repo, packed_bundle: Path) -> None:
    repo, root, name = signed_repo
    env = repo.export_signed(name, tmp_path / f"{name}.signed")
    vt = verify_signed_bundle(env, root, tmp_path / "cache", tmp_path / "out")
    assert vt.path.read_bytes() == packed_bundle.read_bytes()
    data = bytearray(env.read_bytes())
    idx = data.find(packed_bundle.read_bytes()[2000:2064])
    data[idx] ^= 0x01
    bad = tmp_path / "bad.signed"
    bad.write_bytes(bytes(data))
    out2 = tmp_path / "out2"
    with pytest.raises(VerificationError, match="hash"):
        verify_signed_bundle(bad, root, tmp_path / "cache2", out2)
    assert list(out2.iterdir()) == []


def test_signed_bundle_from_another_fleet_refused(tmp_path: Path, signed_repo) -> None:
    repo, _, name = signed_repo
    other_root = init_keys(tmp_path / "other-keys")
    env = repo.export_signed(name, tmp_path / "x.signed")
    with pytest.raises(VerificationError):
        verify_signed_bundle(env, other_root, tmp_path / "cache", tmp_path / "out")


def test_keys_thresholds_validated(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="threshold"):
        init_keys(tmp_path / "k", thresholds={"targets": 3}, counts={"targets": 2})


def test_signed_bundle_can_be_republished_in_another_repository(tmp_path: Path, signed_repo, packed_bundle: Path) -> None:
    repo, _, name = signed_repo
    env = repo.export_signed(name, tmp_path / f"{name}.signed")
    other_root = init_keys(tmp_path / "fleet2-keys")
    fleet2 = Repository.create(tmp_path / "fleet2", tmp_path / "fleet2-keys")
    assert fleet2.add_bundle(env) == name
    vt = verify_bundle_file(packed_bundle, other_root, fleet2.dir)
    assert vt.sha256 == repo.list_targets()[0].sha256


def test_rotation_keeps_the_role_key_count_and_threshold(tmp_path: Path, signed_repo, packed_bundle: Path) -> None:
    repo, root, _ = signed_repo  # targets: 3 keys, threshold 2
    repo.rotate_key("targets")
    roles = json.loads((repo.metadata_dir / "root.json").read_text())["signed"]["roles"]
    assert len(roles["targets"]["keyids"]) == 3 and roles["targets"]["threshold"] == 2
    assert sorted(e["file"] for e in repo.keys.index["roles"]["targets"]) == ["targets-4.pem", "targets-5.pem", "targets-6.pem"]
    verify_bundle_file(packed_bundle, root, repo.dir)

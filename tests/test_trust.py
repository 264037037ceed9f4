"""TUF trust chain: real python-tuf metadata, real ngclient verification, real files."""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from fixtures_trust import make_bundle_dir

from edgellm.errors import TrustError, VerificationError
from edgellm.trust import Repository, TufClient, init_keys, verify_bundle_file, verify_signed_bundle


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


def test_signed_bundle_can_be_republished_in_another_repository(
    tmp_path: Path, signed_repo, packed_bundle: Path
) -> None:
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
    assert sorted(e["file"] for e in repo.keys.index["roles"]["targets"]) == [
        "targets-4.pem",
        "targets-5.pem",
        "targets-6.pem",
    ]
    verify_bundle_file(packed_bundle, root, repo.dir)


# ---- envelopes: checked against signed metadata before anything is written ---------------------


def _rewrite_envelope(src: Path, dst: Path, change) -> Path:
    """Copy a signed bundle member by member; ``change(info, data)`` returns the members to write instead."""
    import io
    import tarfile

    with tarfile.open(src) as t, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as out:
        for m in t.getmembers():
            data = t.extractfile(m).read()
            for ti, d in change(m, data):
                out.addfile(ti, io.BytesIO(d))
    return dst


_LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # no file of ours may grow past 1 MiB
from edgellm.errors import VerificationError
from edgellm.trust import verify_signed_bundle
try:
    verify_signed_bundle(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])
except VerificationError as e:
    print("REFUSED", e)
else:
    print("ACCEPTED")
"""


@pytest.mark.parametrize("kind", ["sparse", "padded"])
def test_signed_bundle_target_over_its_signed_length_refused_before_writing(
    tmp_path: Path, signed_repo, kind: str
) -> None:
    import subprocess
    import sys

    repo, root, name = signed_repo
    env = repo.export_signed(name, tmp_path / "good.signed")
    claimed = 8 << 20  # 8 MiB claimed; the signed length is ~5 KB

    def change(m, data):
        if not m.name.startswith("targets/"):
            return [(m, data)]
        if kind == "sparse":  # 10 KB stored, 8 MiB once extracted
            m.size = len(data)
            m.pax_headers = {"GNU.sparse.map": f"0,{len(data)}", "GNU.sparse.size": str(claimed)}
            return [(m, data)]
        m.size = claimed
        return [(m, data + b"\0" * (claimed - len(data)))]

    bad = _rewrite_envelope(env, tmp_path / "bad.signed", change)
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-c", _LIMITED, str(bad), str(root), str(tmp_path / "cache"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.stdout.startswith("REFUSED"), r.stdout + r.stderr
    assert "File too large" not in r.stdout and "truncated" not in r.stdout
    assert ("sparse" in r.stdout) if kind == "sparse" else ("signed length" in r.stdout)
    assert list(out.iterdir()) == []


def test_signed_bundle_duplicate_entry_says_so(tmp_path: Path, signed_repo) -> None:
    repo, root, name = signed_repo
    env = repo.export_signed(name, tmp_path / "good.signed")
    dup = _rewrite_envelope(
        env, tmp_path / "dup.signed", lambda m, d: [(m, d), (m, d)] if m.name == "metadata/1.root.json" else [(m, d)]
    )
    with pytest.raises(VerificationError, match="appears twice") as ei:
        verify_signed_bundle(dup, root, tmp_path / "cache", tmp_path / "out")
    assert "truncated" not in str(ei.value) and "File exists" not in str(ei.value)


def test_signed_bundle_overlong_entry_name_says_so(tmp_path: Path, signed_repo) -> None:
    repo, root, name = signed_repo
    env = repo.export_signed(name, tmp_path / "good.signed")

    def rename(m, d):
        if m.name.startswith("targets/"):
            m.name = m.name + "x" * 300
        return [(m, d)]

    with pytest.raises(VerificationError, match="too long") as ei:
        verify_signed_bundle(
            _rewrite_envelope(env, tmp_path / "long.signed", rename), root, tmp_path / "cache", tmp_path / "out"
        )
    assert "truncated" not in str(ei.value)


def test_large_targets_metadata_fits_in_a_signed_bundle(tmp_path: Path, signed_repo, packed_bundle: Path) -> None:
    repo, root, name = signed_repo
    # a fleet with many targets: ~1 MB of targets metadata, well within the online limit of 5 MB
    repo.add_bundle(packed_bundle, name="notes.bundle", custom={"edgellm": {"name": "demo"}, "notes": "n" * 1_000_000})
    assert 512_000 < (repo.metadata_dir / "targets.json").stat().st_size < 5_000_000
    env = repo.export_signed(name, tmp_path / f"{name}.signed")
    vt = verify_signed_bundle(env, root, tmp_path / "cache", tmp_path / "out")
    assert vt.name == name
    # and online the same metadata is accepted by a device
    assert {t.name for t in _client(repo, root, tmp_path / "cache2").targets()} == {name, "notes.bundle"}
    from edgellm.trust import MAX_METADATA_BYTES, ClientConfig

    assert ClientConfig().targets_max_length == MAX_METADATA_BYTES  # one limit, online and offline


# ---- long names, all-or-nothing publishing, concurrent writers -------------------------------


@pytest.mark.parametrize("profile", ["jetson-agx-orin-64gb", "x86-avx512-ipc-32gb"])
def test_long_bundle_names_export_and_install_offline(
    tmp_path: Path, signed_repo, packed_bundle: Path, profile: str
) -> None:
    repo, root, _ = signed_repo
    long_name = f"tinyllama-chat-finetuned-1.2.0-{profile}.bundle"
    name = repo.add_bundle(packed_bundle, name=long_name)
    a = repo.export_signed(name, tmp_path / "a" / f"{name}.signed")
    b = repo.export_signed(name, tmp_path / "b" / f"{name}.signed")
    assert a.read_bytes() == b.read_bytes()  # deterministic
    vt = verify_signed_bundle(a, root, tmp_path / "cache", tmp_path / "out")
    assert vt.name == long_name and vt.path.read_bytes() == packed_bundle.read_bytes()


def _repo_state(repo: Repository) -> dict[str, bytes]:
    return {p.relative_to(repo.dir).as_posix(): p.read_bytes() for p in sorted(repo.dir.rglob("*")) if p.is_file()}


def test_publish_is_all_or_nothing(tmp_path: Path, signed_repo) -> None:
    from edgellm.bundle import pack

    repo, root, _ = signed_repo
    before = _repo_state(repo)
    b1 = pack(
        make_bundle_dir(tmp_path / "s1", version="2.0.0"), tmp_path / "demo-2.0.0-jetson-agx-orin-64gb.bundle"
    ).path
    b2 = pack(
        make_bundle_dir(tmp_path / "s2", version="2.0.1"), tmp_path / "demo-2.0.1-x86-avx512-ipc-32gb.bundle"
    ).path
    (tmp_path / "blocked").write_text("a file where a directory should be")
    dist = tmp_path / "dist"
    with pytest.raises(OSError):
        with repo.transaction():
            n1 = repo.add_bundle(b1)
            repo.export_signed(n1, dist / f"{n1}.signed")
            n2 = repo.add_bundle(b2)
            repo.export_signed(n2, tmp_path / "blocked" / f"{n2}.signed")  # the second output cannot be written
    assert _repo_state(repo) == before
    assert not dist.exists() or list(dist.iterdir()) == []
    assert not [p for p in repo.dir.iterdir() if p.name.startswith(".staging")]
    # the same publish with writable outputs goes through, and installs offline
    with repo.transaction():
        n1 = repo.add_bundle(b1)
        out = repo.export_signed(n1, dist / f"{n1}.signed")
        assert not out.exists()  # appears only when the repository has it
    assert out.exists()
    assert verify_signed_bundle(out, root, tmp_path / "cache", tmp_path / "inbox").edgellm["version"] == "2.0.0"


def test_concurrent_writers_leave_a_consistent_repository(tmp_path: Path, signed_repo) -> None:
    import threading

    from edgellm.bundle import pack

    repo, root, first = signed_repo
    bundles = [
        pack(make_bundle_dir(tmp_path / f"s{i}", version=f"3.0.{i}"), tmp_path / f"demo-3.0.{i}.bundle").path
        for i in range(6)
    ]
    errors: list[BaseException] = []

    def run(fn) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def publisher(b: Path) -> None:
        Repository(repo.dir, repo.keys.dir).add_bundle(b)

    def refresher() -> None:
        r = Repository(repo.dir, repo.keys.dir)
        for _ in range(8):
            r.refresh_timestamp()

    threads = [threading.Thread(target=run, args=(lambda b=b: publisher(b),)) for b in bundles]
    threads += [threading.Thread(target=run, args=(refresher,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    expected = {first} | {b.name for b in bundles}
    assert {t.name for t in repo.list_targets()} == expected  # no publish was lost
    ts = json.loads((repo.metadata_dir / "timestamp.json").read_text())["signed"]
    snap = json.loads((repo.metadata_dir / "snapshot.json").read_text())["signed"]
    assert ts["meta"]["snapshot.json"]["version"] == snap["version"]
    assert ts["version"] == 1 + 6 + 16 + 1  # create, six publishes, sixteen refreshes, the fixture's publish
    assert {t.name for t in _client(repo, root, tmp_path / "cache").targets()} == expected


# ---- a root signed elsewhere ---------------------------------------------------------------------


def test_repository_from_online_keys_with_root_signed_offline(tmp_path: Path, packed_bundle: Path) -> None:
    from edgellm.trust import copy_online_keys

    root = init_keys(tmp_path / "offline")  # on the operator's offline machine
    online = copy_online_keys(tmp_path / "offline", tmp_path / "server-keys")
    assert not list(online.glob("root-*.pem")) and list(online.glob("targets-*.pem"))
    repo = Repository.create(tmp_path / "repo", online, root=root.read_bytes())
    name = repo.add_bundle(packed_bundle)
    repo.refresh_timestamp()
    assert verify_bundle_file(packed_bundle, root, repo.dir).name == name
    with pytest.raises(TrustError, match="no private key for role 'root'"):
        repo.rotate_key("targets")  # needs the offline root keys
    # a root that does not trust these keys is refused, and so is one that is not signed
    other = init_keys(tmp_path / "other")
    with pytest.raises(TrustError, match="does not hold enough of the targets keys"):
        Repository.create(tmp_path / "repo2", online, root=other)
    unsigned = json.loads(root.read_text())
    unsigned["signatures"] = []
    with pytest.raises(TrustError, match="not a validly signed root"):
        Repository.create(tmp_path / "repo3", online, root=json.dumps(unsigned).encode())


def test_cli_root_keys_stay_offline(tmp_path: Path, packed_bundle: Path) -> None:
    from click.testing import CliRunner

    from edgellm.cli import main

    def run(*args: str) -> str:
        r = CliRunner().invoke(main, list(args), catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    run("keys", "init", str(tmp_path / "offline"))
    run("keys", "copy-online", str(tmp_path / "offline"), str(tmp_path / "online"))
    assert not list((tmp_path / "online").glob("root-*.pem"))
    run(
        "repo",
        "init",
        str(tmp_path / "repo"),
        "--keys",
        str(tmp_path / "online"),
        "--root",
        str(tmp_path / "offline" / "root.json"),
    )
    out = run(
        "repo",
        "add",
        str(tmp_path / "repo"),
        str(packed_bundle),
        "--keys",
        str(tmp_path / "online"),
        "--export",
        str(tmp_path / "dist"),
    )
    assert "published demo-1.0.0.bundle" in out
    run(
        "bundle",
        "verify",
        str(tmp_path / "dist" / "demo-1.0.0.bundle.signed"),
        "--root",
        str(tmp_path / "offline" / "root.json"),
    )


def test_signed_bundles_of_one_publish_install_offline_in_any_order(tmp_path: Path, keys_dir: Path) -> None:
    from click.testing import CliRunner

    from edgellm.bundle import pack
    from edgellm.cli import main

    Repository.create(tmp_path / "repo", keys_dir)
    b1 = pack(
        make_bundle_dir(tmp_path / "s1", version="1.0.0"), tmp_path / "demo-1.0.0-jetson-agx-orin-64gb.bundle"
    ).path
    b2 = pack(
        make_bundle_dir(tmp_path / "s2", version="1.0.0"), tmp_path / "demo-1.0.0-x86-avx512-ipc-32gb.bundle"
    ).path
    r = CliRunner().invoke(
        main,
        [
            "repo",
            "add",
            str(tmp_path / "repo"),
            str(b1),
            str(b2),
            "--keys",
            str(keys_dir),
            "--export",
            str(tmp_path / "dist"),
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    cache = tmp_path / "device-cache"  # one device, the later bundle first
    for b in (b2, b1):
        vt = verify_signed_bundle(
            tmp_path / "dist" / f"{b.name}.signed", keys_dir / "root.json", cache, tmp_path / f"in-{b.name}"
        )
        assert vt.name == b.name


def test_signed_bundle_missing_metadata_is_a_verification_error(tmp_path: Path, signed_repo) -> None:
    repo, root, name = signed_repo
    env = repo.export_signed(name, tmp_path / "good.signed")
    cut = _rewrite_envelope(env, tmp_path / "cut.signed", lambda m, d: [] if "snapshot" in m.name else [(m, d)])
    with pytest.raises(VerificationError, match="lacks metadata"):
        verify_signed_bundle(cut, root, tmp_path / "cache", tmp_path / "out")


def test_timestamp_refresh_in_another_process_does_not_race_publish(tmp_path: Path, signed_repo) -> None:
    import subprocess
    import sys

    from edgellm.bundle import pack

    repo, root, first = signed_repo
    bundles = [
        pack(make_bundle_dir(tmp_path / f"s{i}", version=f"4.0.{i}"), tmp_path / f"demo-4.0.{i}.bundle").path
        for i in range(6)
    ]
    code = (
        "import sys\nfrom edgellm.trust import Repository\nr = Repository(sys.argv[1], sys.argv[2])\n"
        "print('go', flush=True)\nfor _ in range(20):\n    r.refresh_timestamp()\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", code, str(repo.dir), str(repo.keys.dir)], stdout=subprocess.PIPE, text=True
    )
    assert server.stdout.readline().strip() == "go"
    for b in bundles:
        Repository(repo.dir, repo.keys.dir).add_bundle(b)
    assert server.wait(timeout=120) == 0
    ts = json.loads((repo.metadata_dir / "timestamp.json").read_text())["signed"]
    snap = json.loads((repo.metadata_dir / "snapshot.json").read_text())["signed"]
    assert ts["meta"]["snapshot.json"]["version"] == snap["version"]
    assert ts["version"] == 2 + 6 + 20
    assert {t.name for t in _client(repo, root, tmp_path / "cache").targets()} == {first} | {b.name for b in bundles}

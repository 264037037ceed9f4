"""Bundles: deterministic pack, typed manifest round trip, hostile archives refused."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from fixtures_trust import make_bundle_dir

from edgellm.bundle import Manifest, UnpackLimits, pack, read_manifest, unpack
from edgellm.errors import BundleError, BundleIntegrityError


def test_pack_twice_gives_identical_bytes(tmp_path: Path, bundle_src: Path) -> None:
    a = pack(bundle_src, tmp_path / "a.bundle")
    os.utime(bundle_src / "model.gguf", (1, 1))  # a different mtime must not matter
    b = pack(bundle_src, tmp_path / "b.bundle")
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.sha256 == b.sha256


def test_pack_fills_hashes_and_unpack_round_trips(tmp_path: Path, packed_bundle: Path, bundle_src: Path) -> None:
    m = unpack(packed_bundle, tmp_path / "out")
    assert {f.path for f in m.files} == {"model.gguf", "generation.json"}
    assert (tmp_path / "out" / "model.gguf").read_bytes() == (bundle_src / "model.gguf").read_bytes()
    assert Manifest.load(tmp_path / "out" / "manifest.json").file("model.gguf").size == 4096


def test_unknown_manifest_fields_survive_round_trip(tmp_path: Path) -> None:
    src = make_bundle_dir(
        tmp_path / "src", extra={"future_field": {"a": [1, 2]}, "lineage": {"parent_version": "0.9", "novel": True}}
    )
    r = pack(src, tmp_path / "x.bundle")
    m = read_manifest(r.path)
    assert m.extra["future_field"] == {"a": [1, 2]}
    assert m.lineage.parent_version == "0.9" and m.lineage.extra == {"novel": True}
    again = Manifest.from_json(m.to_json())
    assert again.to_dict() == m.to_dict()


@pytest.mark.parametrize(
    "field,value", [("runtime", "tflite"), ("name", "../evil"), ("artifact", "/etc/passwd"), ("schema_version", 99)]
)
def test_invalid_manifest_refused(tmp_path: Path, field: str, value: object) -> None:
    src = make_bundle_dir(tmp_path / "src", extra={field: value})
    with pytest.raises(BundleError, match=field):
        pack(src, tmp_path / "x.bundle")
    assert not (tmp_path / "x.bundle").exists()


# ---- hostile archives ------------------------------------------------------------------


def _manifest_bytes(files: dict[str, bytes]) -> bytes:
    import hashlib

    return json.dumps(
        {
            "name": "evil",
            "version": "1",
            "runtime": "gguf",
            "artifact": next(iter(files), "model.gguf"),
            "files": [{"path": p, "sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for p, b in files.items()],
        }
    ).encode()


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def _reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def _hostile(tmp_path: Path, kind: str) -> Path:
    ok = b"x" * 100
    man = _reg("manifest.json", _manifest_bytes({"model.gguf": ok}))
    if kind == "traversal":
        return _tar(tmp_path / "a.tar", [man, _reg("../../escape.txt", ok)])
    if kind == "absolute":
        return _tar(tmp_path / "a.tar", [man, _reg("/tmp/edgellm-abs-escape.txt", ok)])
    if kind == "symlink":
        ti = tarfile.TarInfo("model.gguf")
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        return _tar(tmp_path / "a.tar", [man, (ti, None)])
    if kind == "hardlink":
        ti = tarfile.TarInfo("model.gguf")
        ti.type, ti.linkname = tarfile.LNKTYPE, "manifest.json"
        return _tar(tmp_path / "a.tar", [man, (ti, None)])
    if kind == "device":
        ti = tarfile.TarInfo("model.gguf")
        ti.type = tarfile.CHRTYPE
        return _tar(tmp_path / "a.tar", [man, (ti, None)])
    if kind == "oversized":
        return _tar(tmp_path / "a.tar", [man, _reg("model.gguf", ok)])
    if kind == "too_many":
        files = {f"f{i}.bin": b"y" for i in range(70)}
        return _tar(
            tmp_path / "a.tar", [_reg("manifest.json", _manifest_bytes(files))] + [_reg(p, b) for p, b in files.items()]
        )
    if kind == "unlisted":
        return _tar(tmp_path / "a.tar", [man, _reg("model.gguf", ok), _reg("extra.sh", b"rm -rf /")])
    if kind == "hash_mismatch":
        return _tar(tmp_path / "a.tar", [man, _reg("model.gguf", b"y" * 100)])
    if kind == "missing_file":
        return _tar(tmp_path / "a.tar", [man])
    if kind == "duplicate":
        return _tar(tmp_path / "a.tar", [man, _reg("model.gguf", ok), _reg("model.gguf", ok)])
    if kind == "not_a_tar":
        (tmp_path / "a.tar").write_bytes(os.urandom(3000))
        return tmp_path / "a.tar"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "traversal",
        "absolute",
        "symlink",
        "hardlink",
        "device",
        "oversized",
        "too_many",
        "unlisted",
        "hash_mismatch",
        "missing_file",
        "duplicate",
        "not_a_tar",
    ],
)
def test_hostile_archive_refused_and_leaves_nothing(tmp_path: Path, kind: str) -> None:
    archive = _hostile(tmp_path, kind)
    work = tmp_path / "work"
    work.mkdir()
    limits = UnpackLimits(max_files=64, max_file_bytes=50 if kind == "oversized" else 1 << 20)
    with pytest.raises(BundleError) as ei:
        unpack(archive, work / "dest", limits)
    assert str(ei.value)  # a message a person can read
    assert list(work.iterdir()) == []  # no dest, no temp dir left behind
    assert not (tmp_path.parent / "escape.txt").exists()
    assert not Path("/tmp/edgellm-abs-escape.txt").exists()


def test_hash_mismatch_is_an_integrity_error(tmp_path: Path) -> None:
    with pytest.raises(BundleIntegrityError, match="model.gguf"):
        unpack(_hostile(tmp_path, "hash_mismatch"), tmp_path / "dest")


@pytest.mark.parametrize("cut", [0.3, 0.7, 0.99])
def test_truncated_archive_refused(tmp_path: Path, packed_bundle: Path, cut: float) -> None:
    data = packed_bundle.read_bytes()
    with tarfile.open(packed_bundle) as t:
        end = max(m.offset_data + m.size for m in t.getmembers())  # past this is only padding
    trunc = tmp_path / "t.bundle"
    trunc.write_bytes(data[: int(end * cut)])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(BundleError, match="truncated|missing|not a bundle"):
        unpack(trunc, work / "dest")
    assert list(work.iterdir()) == []


def test_flipped_byte_in_payload_refused(tmp_path: Path, packed_bundle: Path) -> None:
    data = bytearray(packed_bundle.read_bytes())
    m = read_manifest(packed_bundle)
    assert m.file("model.gguf").size == 4096
    idx = data.find((tmp_path / "src" / "model.gguf").read_bytes()[:64])
    data[idx + 10] ^= 0xFF
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError):
        unpack(bad, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_unpack_refuses_existing_destination(tmp_path: Path, packed_bundle: Path) -> None:
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="already exists"):
        unpack(packed_bundle, tmp_path / "dest")
    assert (tmp_path / "dest" / "keep.txt").read_text() == "mine"


def test_pack_refuses_symlink_in_source(tmp_path: Path, bundle_src: Path) -> None:
    (bundle_src / "link").symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match="symlink"):
        pack(bundle_src, tmp_path / "x.bundle")


# ---- long names (PAX) and clear refusals -------------------------------------------------------


def test_long_member_names_pack_deterministically_and_round_trip(tmp_path: Path, bundle_src: Path) -> None:
    long_name = "weights/" + "jetson-agx-orin-64gb-" * 7 + "adapter.bin"  # over USTAR's 100 characters
    (bundle_src / "weights").mkdir()
    (bundle_src / long_name).write_bytes(b"w" * 300)
    a = pack(bundle_src, tmp_path / "a.bundle")
    b = pack(bundle_src, tmp_path / "b.bundle")
    assert a.path.read_bytes() == b.path.read_bytes()
    with tarfile.open(a.path) as t:
        assert all(
            m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.mode == 0o644 for m in t.getmembers()
        )
    m = unpack(a.path, tmp_path / "out")
    assert (tmp_path / "out" / long_name).read_bytes() == b"w" * 300
    assert m.file(long_name).size == 300


def _entry(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def _pax(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data))
    return path


def test_member_name_over_the_file_system_limit_says_so(tmp_path: Path) -> None:
    name = "m" * 300
    archive = _pax(tmp_path / "a.tar", [_entry("manifest.json", _manifest_bytes({name: b"x"})), _entry(name, b"x")])
    with pytest.raises(BundleError, match="too long") as ei:
        unpack(archive, tmp_path / "dest")
    assert "truncated" not in str(ei.value)


@pytest.mark.parametrize("order", [["a", "a/b"], ["a/b", "a"]])
def test_file_and_directory_of_the_same_name_says_so(tmp_path: Path, order: list[str]) -> None:
    files = {p: p.encode() for p in order}
    archive = _pax(
        tmp_path / "a.tar", [_entry("manifest.json", _manifest_bytes(files))] + [_entry(p, b) for p, b in files.items()]
    )
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(BundleError, match="both a file and a directory") as ei:
        unpack(archive, work / "dest")
    assert "truncated" not in str(ei.value) and "Errno" not in str(ei.value)
    assert list(work.iterdir()) == []


def test_duplicate_member_says_so(tmp_path: Path) -> None:
    ok = b"x" * 100
    archive = _pax(
        tmp_path / "a.tar",
        [
            _entry("manifest.json", _manifest_bytes({"model.gguf": ok})),
            _entry("model.gguf", ok),
            _entry("model.gguf", ok),
        ],
    )
    with pytest.raises(BundleError, match="appears twice") as ei:
        unpack(archive, tmp_path / "dest")
    assert "truncated" not in str(ei.value)


def test_sparse_member_refused(tmp_path: Path) -> None:
    ti, data = _entry("model.gguf", b"x" * 100)
    ti.pax_headers = {"GNU.sparse.map": "0,100", "GNU.sparse.size": str(1 << 20)}
    archive = _pax(
        tmp_path / "a.tar", [_entry("manifest.json", _manifest_bytes({"model.gguf": b"x" * 100})), (ti, data)]
    )
    with pytest.raises(BundleError, match="sparse"):
        unpack(archive, tmp_path / "dest")

"""Bundles: a model artifact plus everything needed to run and judge it.

A bundle is an uncompressed, deterministic (PAX) tar archive::

    manifest.json        typed manifest (see :class:`Manifest`), lists every other file
    model.gguf | model.onnx
    tokenizer.json       (ONNX bundles; GGUF carries its tokenizer)
    ...                  any other file listed in the manifest

``pack`` writes the same bytes for the same inputs (sorted entries, fixed timestamps, owners
and modes; names of any length). ``unpack`` is written for hostile input: the member checks of
:mod:`edgellm._archive` (no absolute paths, ``..``, links, device or sparse files, duplicate
names, over-long names, a name both file and directory, more files or bytes than
:class:`UnpackLimits` allows), plus any file whose size or hash differs from the manifest (never
more than the manifest's size is written); nothing is written outside a temporary directory until
every check passed, and the result appears atomically.

Errors (from :mod:`edgellm.errors`)::

    EdgeLLMError
    └── BundleError               malformed or hostile archive or manifest, over a limit
        └── BundleIntegrityError  a file's size or sha256 differs from the manifest

Verification of *who* made a bundle (signatures) is :mod:`edgellm.trust`'s job and must run
before ``unpack`` ever sees downloaded bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgellm._archive import MemberGuard, extract_member, name_problem, open_tar, read_member, write_archive
from edgellm._fs import atomic_write, fsync_dir, sha256_file
from edgellm._record import Record
from edgellm.errors import BundleError, BundleIntegrityError
from edgellm.formats import RUNTIMES
from edgellm.ids import ID_RULE, valid_id

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- manifest


class _Record(Record):
    """Manifest parts: unknown fields kept in ``extra``; bad input is a :class:`BundleError`."""

    error = BundleError

    @classmethod
    def from_dict(cls, d: Any, where: str = "") -> Any:
        try:
            return super().from_dict(d)
        except BundleError as e:
            raise BundleError(f"manifest{where}: {e}") from e


@dataclasses.dataclass
class FileEntry(_Record):
    path: str
    sha256: str
    size: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MemoryRequirements(_Record):
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    context_length: int = 0
    peak_bytes: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Lineage(_Record):
    parent_version: str | None = None
    data_sha256: str | None = None
    build_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    created_by: str = "edgellm"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class GoldenPrompt(_Record):
    """A prompt the device runs in its health check before a new model becomes current."""

    prompt: str
    max_tokens: int = 16
    expect: str | None = None  # optional substring the greedy output must contain
    chat: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Manifest(_Record):
    name: str
    version: str
    runtime: str
    artifact: str
    quantization: str = "none"
    profiles: list[str] = dataclasses.field(default_factory=list)
    tokenizer: str | None = None
    files: list[FileEntry] = dataclasses.field(default_factory=list)
    memory: MemoryRequirements = dataclasses.field(default_factory=MemoryRequirements)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)
    lineage: Lineage = dataclasses.field(default_factory=Lineage)
    golden_prompts: list[GoldenPrompt] = dataclasses.field(default_factory=list)
    health: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> Manifest:
        d = dict(d)
        if not isinstance(d.get("files", []), list) or not isinstance(d.get("golden_prompts", []), list):
            raise BundleError("manifest: 'files' and 'golden_prompts' must be lists")
        d["files"] = [FileEntry.from_dict(x, ".files[]") for x in d.get("files", [])]
        d["golden_prompts"] = [GoldenPrompt.from_dict(x, ".golden_prompts[]") for x in d.get("golden_prompts", [])]
        d["memory"] = MemoryRequirements.from_dict(d.get("memory", {}), ".memory")
        d["lineage"] = Lineage.from_dict(d.get("lineage", {}), ".lineage")
        m: Manifest = super().from_dict(d, where)
        m.validate()
        return m

    def validate(self) -> None:
        def bad(field: str, why: str) -> BundleError:
            return BundleError(f"manifest.json: {field}: {why}", hint="fix the manifest and pack the bundle again")

        if self.schema_version != SCHEMA_VERSION:
            raise bad(
                "schema_version",
                f"unsupported version {self.schema_version!r} (this edgellm reads {SCHEMA_VERSION}); upgrade edgellm",
            )
        for field in ("name", "version"):
            v = getattr(self, field)
            if not valid_id(v):
                raise bad(field, f"must be {ID_RULE}, got {v!r}")
        if self.runtime not in RUNTIMES:
            raise bad("runtime", f"must be one of {RUNTIMES}, got {self.runtime!r}")
        for field in ("artifact", "tokenizer"):
            v = getattr(self, field)
            problem = None if v is None else name_problem(v)
            if problem is not None:
                raise bad(field, f"must be a relative path inside the bundle: {problem}")
        if not isinstance(self.profiles, list) or not all(isinstance(p, str) for p in self.profiles):
            raise bad("profiles", "must be a list of profile names")
        seen = set()
        for fe in self.files:
            problem = name_problem(fe.path) or (f"{fe.path!r} is reserved" if fe.path == MANIFEST_NAME else None)
            if problem is not None:
                raise bad("files", f"path {problem}")
            if fe.path in seen:
                raise bad("files", f"duplicate path {fe.path!r}")
            seen.add(fe.path)
            if not (isinstance(fe.sha256, str) and re.fullmatch(r"[0-9a-f]{64}", fe.sha256)):
                raise bad(f"files[{fe.path}].sha256", "must be 64 lowercase hex chars")
            if not isinstance(fe.size, int) or fe.size < 0:
                raise bad(f"files[{fe.path}].size", "must be a non-negative integer")
        if self.files and self.artifact not in seen:
            raise bad("artifact", f"{self.artifact!r} is not listed in files")
        if self.files and self.tokenizer is not None and self.tokenizer not in seen:
            raise bad("tokenizer", f"{self.tokenizer!r} is not listed in files")

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for fe in self.files:
            if fe.path == path:
                return fe
        raise KeyError(path)

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str, where: str = "manifest.json") -> Manifest:
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleError(
                f"{where}: not valid JSON ({e})", hint="the bundle is corrupted: rebuild or re-download it"
            ) from e
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise BundleError(f"{p}: cannot read manifest ({e.strerror})") from e
        return cls.from_json(data, where=str(p))

    def dump(self, path: str | Path) -> None:
        atomic_write(Path(path), self.to_json())


# --------------------------------------------------------------------------- pack


@dataclasses.dataclass(frozen=True)
class PackResult:
    path: Path
    sha256: str
    size: int
    manifest: Manifest


def _scan(src: Path) -> list[str]:
    files = []
    for root, dirs, names in os.walk(src):
        dirs.sort()
        for n in names:
            full = Path(root) / n
            rel = full.relative_to(src).as_posix()
            if full.is_symlink():
                raise BundleError(
                    f"{full}: symlinks cannot go into a bundle", hint="copy the file itself into the directory"
                )
            if not full.is_file():
                raise BundleError(f"{full}: not a regular file")
            if rel == MANIFEST_NAME:
                continue
            problem = name_problem(rel)
            if problem is not None:
                raise BundleError(
                    f"{full}: file name {problem}: not allowed in a bundle", hint="use short [A-Za-z0-9._-] names"
                )
            files.append(rel)
    return sorted(files)


def build_manifest(src_dir: str | Path) -> Manifest:
    """Read ``src_dir/manifest.json`` and fill its file list with hashes and sizes."""
    src = Path(src_dir)
    if not (src / MANIFEST_NAME).is_file():
        raise BundleError(
            f"{src}: no {MANIFEST_NAME}", hint="write a manifest.json with at least name, version, runtime and artifact"
        )
    manifest = Manifest.load(src / MANIFEST_NAME)
    rels = _scan(src)
    manifest.files = [FileEntry(path=r, sha256=sha256_file(src / r), size=(src / r).stat().st_size) for r in rels]
    manifest.validate()
    return manifest


def pack(src_dir: str | Path, out: str | Path) -> PackResult:
    """Pack ``src_dir`` into a deterministic bundle archive at ``out`` (written atomically)."""
    src = Path(src_dir)
    out = Path(out)
    manifest = build_manifest(src)
    entries: list[tuple[str, bytes | Path]] = [(MANIFEST_NAME, manifest.to_json())]
    entries += [(fe.path, src / fe.path) for fe in manifest.files]
    write_archive(out, entries)
    digest = sha256_file(out)
    logger.info("packed %s (%d files, sha256 %s)", out, len(manifest.files) + 1, digest)
    return PackResult(out, digest, out.stat().st_size, manifest)


# --------------------------------------------------------------------------- unpack


@dataclasses.dataclass(frozen=True)
class UnpackLimits:
    max_files: int = 64
    max_total_bytes: int = 8 << 30  # 8 GiB
    max_file_bytes: int = 8 << 30
    max_manifest_bytes: int = 1 << 20


def _guard(limits: UnpackLimits) -> MemberGuard:
    return MemberGuard(max_files=limits.max_files, max_total_bytes=limits.max_total_bytes)


def read_manifest(archive: str | Path, limits: UnpackLimits = UnpackLimits()) -> Manifest:
    """Read only the manifest of a bundle archive (first entry) without extracting anything."""
    with open(archive, "rb") as f:
        tar = open_tar(f)
        for m in _guard(limits).members(tar, limits.max_file_bytes):
            if m.name != MANIFEST_NAME:
                break
            return Manifest.from_json(read_member(tar, m, limits.max_manifest_bytes))
    raise BundleError(
        f"{archive}: manifest.json is not the first entry", hint="pack bundles with `edgellm bundle pack`"
    )


def unpack(archive: str | Path, dest: str | Path, limits: UnpackLimits = UnpackLimits()) -> Manifest:
    """Safely extract a bundle to ``dest`` (which must not exist). Atomic: all or nothing."""
    dest = Path(dest)
    if dest.exists():
        raise BundleError(f"{dest} already exists", hint="unpack into a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".unpack"))
    try:
        manifest = _extract_checked(Path(archive), tmp, limits)
        for root, _dirs, names in os.walk(tmp):
            for n in names:
                with open(Path(root) / n, "rb") as f:
                    os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _extract_checked(archive: Path, tmp: Path, limits: UnpackLimits) -> Manifest:
    manifest: Manifest | None = None
    seen: set[str] = set()
    with open(archive, "rb") as f:
        tar = open_tar(f)
        for m in _guard(limits).members(tar, limits.max_file_bytes):
            name = m.name
            if manifest is None:
                if name != MANIFEST_NAME:
                    raise BundleError(
                        "manifest.json is not the first entry of the bundle",
                        hint="pack bundles with `edgellm bundle pack`",
                    )
                manifest = Manifest.from_json(read_member(tar, m, limits.max_manifest_bytes))
                continue
            try:
                expected = manifest.file(name)
            except KeyError:
                raise BundleError(
                    f"bundle entry {name!r} is not listed in the manifest: refused",
                    hint="the bundle was altered: re-download it",
                ) from None
            digest, n = (
                ("", m.size) if m.size != expected.size else extract_member(tar, m, tmp / name, max_bytes=expected.size)
            )
            if n != expected.size or digest != expected.sha256:
                raise BundleIntegrityError(
                    f"{name}: sha256/size do not match the manifest (got {n} bytes, {digest[:12]}…)",
                    hint="the bundle was altered or corrupted: re-download it and verify it with `edgellm bundle verify`",
                )
            seen.add(name)
    if manifest is None:
        raise BundleError("bundle is empty (no manifest.json)")
    missing = [fe.path for fe in manifest.files if fe.path not in seen]
    if missing:
        raise BundleError(
            f"bundle is missing files listed in its manifest: {missing}",
            hint="the archive is incomplete: re-download it",
        )
    atomic_write(tmp / MANIFEST_NAME, manifest.to_json())
    return manifest


def describe(archive: str | Path) -> dict[str, Any]:
    """Manifest plus archive hash and size, for ``edgellm bundle inspect``."""
    p = Path(archive)
    m = read_manifest(p)
    return {"path": str(p), "sha256": sha256_file(p), "size": p.stat().st_size, "manifest": m.to_dict()}

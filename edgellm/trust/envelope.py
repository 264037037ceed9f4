"""Signed bundles: a bundle plus the TUF metadata that verifies it, installable offline.

A signed bundle is a deterministic archive (:mod:`edgellm._archive`) holding a tiny TUF
repository, in this order::

    envelope.json                  an unsigned hint (format, target name)
    metadata/1.root.json …         the root chain, timestamp, snapshot and targets
    targets/<sha256>.<name>        the bundle, the one target, last

It is verified exactly like an online update (:class:`~edgellm.trust.client.TufClient`, which
advances the device's metadata cache, so rollback protection holds across online and offline
installs). The metadata is extracted and verified *before* the target is touched: the target
entry must then carry the signed sha256 in its name and the signed length in its header, and
no more than that length is ever written.

Errors (from :mod:`edgellm.errors`)::

    EdgeLLMError
    └── TrustError
        └── VerificationError    every refusal, including a malformed archive (the
                                 archive reader's BundleError is re-raised as this)
"""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgellm._archive import MemberGuard, extract_member, open_tar, read_member, write_archive
from edgellm.bundle import UnpackLimits
from edgellm.errors import BundleError, VerificationError
from edgellm.trust.client import MAX_METADATA_BYTES, FetchError, TufClient, VerifiedTarget

ENVELOPE_NAME = "envelope.json"
ENVELOPE_FORMAT = "edgellm-signed-bundle"
MAX_ENTRIES = 300  # the envelope hint, up to ~290 root versions, three more roles, one target
MAX_HINT_BYTES = 4096
DEFAULT_LIMITS = UnpackLimits()
_HINT = "use a file written by `edgellm repo export` or `edgellm build --repo`"


def write_envelope(out: Path, name: str, metadata: list[tuple[str, bytes]], blob: str, blob_path: Path) -> Path:
    """Write a signed bundle: ``metadata`` (file name, bytes) and the target file ``blob``."""
    hint = json.dumps({"format": ENVELOPE_FORMAT, "version": 1, "target": name}, sort_keys=True).encode()
    entries: list[tuple[str, bytes | Path]] = [(ENVELOPE_NAME, hint)]
    entries += [(f"metadata/{f}", data) for f, data in metadata]
    entries.append((f"targets/{blob}", blob_path))
    return write_archive(out, entries)


def is_signed_bundle(path: str | Path) -> bool:
    """True if ``path`` is a signed bundle (its first tar entry is ``envelope.json``)."""
    try:
        with open(path, "rb") as f:
            first = open_tar(f).next()
            return first is not None and first.name == ENVELOPE_NAME
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a signed bundle
        return False


def _entries(tar: tarfile.TarFile, limits: UnpackLimits) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """``("metadata" | "target", member)`` for each entry, refusing anything else."""
    guard = MemberGuard(max_files=MAX_ENTRIES, max_total_bytes=limits.max_total_bytes)
    for m in guard.members(tar, max(limits.max_file_bytes, MAX_METADATA_BYTES)):
        top, _, rest = m.name.partition("/")
        if m.name == ENVELOPE_NAME:
            read_member(tar, m, MAX_HINT_BYTES)
        elif top == "metadata" and "/" not in rest and rest.endswith(".json"):
            yield "metadata", m
        elif top == "targets" and "/" not in rest and "." in rest:
            yield "target", m
        else:
            raise VerificationError(f"signed bundle entry {m.name!r} is not allowed: refused", hint=_HINT)


def _refused(e: BundleError) -> VerificationError:
    return VerificationError(f"signed bundle: {e.args[0]}", hint=e.hint or "re-copy the file")


def verify_signed_bundle(
    path: str | Path,
    root: str | Path | bytes,
    cache_dir: str | Path,
    out_dir: str | Path,
    *,
    limits: UnpackLimits = DEFAULT_LIMITS,
) -> VerifiedTarget:
    """Verify a signed bundle offline against the pinned ``root``; move the bundle to ``out_dir``.

    Nothing of the bundle is parsed here, and nothing of it is written before the metadata
    that names it was verified.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".envelope-", dir=out_dir) as tmp:
        t = Path(tmp)
        try:
            with open(path, "rb") as f:
                client, name, target = _verify_stream(open_tar(f), t, cache_dir, root, limits)
        except BundleError as e:
            raise _refused(e) from e
        vt = client.verify_file(target, name)
        final = out_dir / name
        os.replace(target, final)
        return dataclasses.replace(vt, path=final)


def _verify_stream(
    tar: tarfile.TarFile, t: Path, cache_dir: str | Path, root: str | Path | bytes, limits: UnpackLimits
) -> tuple[TufClient, str, Path]:
    entries = _entries(tar, limits)
    member = None
    for kind, m in entries:
        if kind == "target":
            member = m
            break
        extract_member(tar, m, t / m.name, max_bytes=MAX_METADATA_BYTES)
    if member is None:
        raise VerificationError("signed bundle holds no target", hint=_HINT)
    digest, _, name = member.name.removeprefix("targets/").partition(".")
    (t / "targets").mkdir()
    client = TufClient(cache_dir, root, t / "metadata", t / "targets")
    try:
        client.refresh()
    except FetchError as e:  # offline, "not found" means the envelope lacks a metadata file
        raise VerificationError(f"signed bundle lacks metadata its chain needs ({e.args[0]})", hint=_HINT) from e
    info = client.info(name)
    if info.hashes.get("sha256") != digest:
        raise VerificationError(
            f"{name}: the envelope's target is not the one the signed metadata names",
            hint="the signed bundle was altered: do not install",
        )
    if member.size != info.length:
        raise VerificationError(
            f"{name}: the envelope holds {member.size} bytes but the signed length is {info.length}: refused",
            hint="the signed bundle was altered: do not install",
        )
    if info.length > limits.max_file_bytes:
        raise VerificationError(
            f"{name}: {info.length} bytes is over this device's limit of {limits.max_file_bytes}",
            hint="publish a smaller artifact for this profile",
        )
    target = t / member.name
    extract_member(tar, member, target, max_bytes=info.length)
    extra = next(entries, None)
    if extra is not None:
        raise VerificationError(f"signed bundle has entries after its target ({extra[1].name!r}): refused", hint=_HINT)
    return client, name, target


def extract_for_republish(path: Path, dest: Path, limits: UnpackLimits = DEFAULT_LIMITS) -> Path:
    """The bundle inside a signed bundle, for publishing it again under other keys (not verified:
    the repository that re-signs it vouches for it)."""
    target = None
    with open(path, "rb") as f:
        tar = open_tar(f)
        for kind, m in _entries(tar, limits):
            if kind == "target":
                if target is not None:
                    raise VerificationError("signed bundle holds more than one target: refused", hint=_HINT)
                target = dest / m.name.removeprefix("targets/")
                extract_member(tar, m, target, max_bytes=limits.max_file_bytes)
    if target is None:
        raise VerificationError(f"{path}: signed bundle holds no target", hint=_HINT)
    return target

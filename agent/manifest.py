"""A thin view of an installed bundle's manifest, and verification of a slot's files.

The manifest type itself is :class:`edgellm.bundle.Manifest`; this module only adds what the
agent needs on top: where the manifest lives in a slot and how to re-check the slot's files
against it (at boot, to prove the current slot is complete).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from agent._fs import sha256_file
from agent.errors import SlotIntegrityError

MANIFEST_NAME = "manifest.json"


def manifest_path(slot_dir: str | Path) -> Path:
    return Path(slot_dir) / MANIFEST_NAME


def manifest_sha256(slot_dir: str | Path) -> str:
    return hashlib.sha256(manifest_path(slot_dir).read_bytes()).hexdigest()


def read_manifest(slot_dir: str | Path) -> Any:
    """The bundle's typed Manifest (edgellm.bundle) of an unpacked slot."""
    from edgellm.bundle import Manifest

    return Manifest.load(manifest_path(slot_dir))


def _file_entries(manifest: Any) -> list[tuple[str, str | None, int | None]]:
    files = getattr(manifest, "files", None)
    if files is None and isinstance(manifest, dict):
        files = manifest.get("files")
    out: list[tuple[str, str | None, int | None]] = []
    if isinstance(files, dict):
        items = files.items()
    else:
        items = [((f.get("path") if isinstance(f, dict) else getattr(f, "path")), f) for f in (files or [])]
    for path, info in items:
        if isinstance(info, str):
            out.append((path, info, None))
        elif isinstance(info, dict):
            out.append((path, info.get("sha256"), info.get("size")))
        else:
            out.append((path, getattr(info, "sha256", None), getattr(info, "size", None)))
    return out


def verify_slot(slot_dir: str | Path, expected_manifest_sha256: str | None, *, deep: bool = True) -> Any:
    """Check that ``slot_dir`` holds exactly what was verified at install time.

    The manifest's own hash must match the one recorded when the TUF-verified archive was
    unpacked; then (``deep``) every file listed by the manifest must match its size and hash.
    Returns the manifest; raises :class:`SlotIntegrityError`.
    """
    slot_dir = Path(slot_dir)
    hint = "the agent will use the other slot; reinstall with `edgellm-agent install` or wait for the next update"
    mp = manifest_path(slot_dir)
    if not mp.is_file():
        raise SlotIntegrityError(f"slot {slot_dir.name} has no manifest", hint=hint)
    if expected_manifest_sha256 and manifest_sha256(slot_dir) != expected_manifest_sha256:
        raise SlotIntegrityError(f"slot {slot_dir.name}: manifest differs from the verified one", hint=hint)
    manifest = read_manifest(slot_dir)
    entries = _file_entries(manifest)
    if not entries:
        raise SlotIntegrityError(f"slot {slot_dir.name}: manifest lists no files", hint=hint)
    root = os.path.realpath(slot_dir)
    for rel, sha, size in entries:
        p = os.path.realpath(slot_dir / rel)
        if not p.startswith(root + os.sep) or not os.path.isfile(p):
            raise SlotIntegrityError(f"slot {slot_dir.name}: {rel} is missing", hint=hint)
        if size is not None and os.path.getsize(p) != int(size):
            raise SlotIntegrityError(f"slot {slot_dir.name}: {rel} has the wrong size", hint=hint)
        if deep and sha and sha256_file(p) != sha:
            raise SlotIntegrityError(f"slot {slot_dir.name}: {rel} does not match its hash", hint=hint)
    return manifest


def mget(obj: Any, key: str, default: Any = None) -> Any:
    """Attribute-or-key access for manifest parts (typed objects or plain dicts)."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)

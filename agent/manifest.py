"""A thin view of an installed bundle's manifest, and verification of a slot's files.

The manifest type itself is :class:`edgellm.bundle.Manifest`; this module only adds what the
agent needs on top: where the manifest lives in a slot and how to re-check the slot's files
against it (at boot, to prove the current slot is complete).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from agent._fs import sha256_file
from agent.errors import SlotIntegrityError

if TYPE_CHECKING:
    from edgellm.bundle import Manifest

MANIFEST_NAME = "manifest.json"


def manifest_path(slot_dir: str | Path) -> Path:
    return Path(slot_dir) / MANIFEST_NAME


def manifest_sha256(slot_dir: str | Path) -> str:
    return hashlib.sha256(manifest_path(slot_dir).read_bytes()).hexdigest()


def read_manifest(slot_dir: str | Path) -> Manifest:
    """The bundle's typed Manifest (edgellm.bundle) of an unpacked slot."""
    from edgellm.bundle import Manifest

    return Manifest.load(manifest_path(slot_dir))


def verify_slot(slot_dir: str | Path, expected_manifest_sha256: str | None, *, deep: bool = True) -> Manifest:
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
    entries = [(f.path, f.sha256, f.size) for f in manifest.files]
    if not entries:
        raise SlotIntegrityError(f"slot {slot_dir.name}: manifest lists no files", hint=hint)
    root = os.path.realpath(slot_dir)
    for rel, sha, size in entries:
        p = os.path.realpath(slot_dir / rel)
        if not p.startswith(root + os.sep) or not os.path.isfile(p):
            raise SlotIntegrityError(f"slot {slot_dir.name}: {rel} is missing", hint=hint)
        if os.path.getsize(p) != size:
            raise SlotIntegrityError(f"slot {slot_dir.name}: {rel} has the wrong size", hint=hint)
        if deep and sha256_file(p) != sha:
            raise SlotIntegrityError(f"slot {slot_dir.name}: {rel} does not match its hash", hint=hint)
    return manifest

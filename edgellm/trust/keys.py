"""Signing keys of a fleet: Ed25519 keys per TUF role, the expiry policy, and the version-1 root.

A keys directory holds ``<role>-<n>.pem`` (0600, PKCS#8), ``keys.json`` (the public index:
role -> files and key ids, retired keys, the expiry policy) and ``root.json`` (the trust root
devices pin). The root's private keys belong offline: :func:`copy_online_keys` makes the keys
directory a server keeps (everything but the root's private keys), and every operation that
needs a missing key says where it must be done.

Errors (from :mod:`edgellm.errors`)::

    EdgeLLMError
    └── TrustError       bad or missing keys directory, unreadable key, bad threshold or duration
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgellm import durations
from edgellm._fs import atomic_write
from edgellm.errors import TrustError

logger = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")
ONLINE_ROLES = ("targets", "snapshot", "timestamp")


@dataclasses.dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=30)
    timestamp: timedelta = timedelta(days=7)

    def for_role(self, role: str) -> timedelta:
        value: timedelta = getattr(self, role)
        return value

    def to_dict(self) -> dict[str, float]:
        return {r: self.for_role(r).total_seconds() for r in ROLES}

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> ExpiryPolicy:
        return cls(**{r: timedelta(seconds=float(d[r])) for r in ROLES if r in d})


def parse_duration(text: str) -> timedelta:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` -> timedelta (see :mod:`edgellm.durations`)."""
    try:
        return durations.parse_duration(text)
    except ValueError as e:
        raise TrustError(str(e), hint=durations.HINT) from None


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def serialize(md: Any) -> bytes:
    """TUF metadata as the (indented, stable) JSON bytes written to disk."""
    from tuf.api.serialization.json import JSONSerializer

    data: bytes = md.to_bytes(JSONSerializer(compact=False))
    return data


def _write_private_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write(path, pem, mode=0o600)


def _load_signer(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from securesystemslib.signer import CryptoSigner

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise TrustError(
            f"{path}: cannot load private key ({e})", hint="check the keys directory made by `edgellm keys init`"
        ) from e
    return CryptoSigner(key)


def _new_signer() -> tuple[Any, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from securesystemslib.signer import CryptoSigner

    key = Ed25519PrivateKey.generate()
    return key, CryptoSigner(key)


class KeyStore:
    """A directory of role keys: ``<role>-<n>.pem`` (0600) plus ``keys.json`` (the public index)."""

    def __init__(self, keys_dir: str | Path) -> None:
        self.dir = Path(keys_dir)
        index = self.dir / "keys.json"
        if not index.is_file():
            raise TrustError(
                f"{self.dir}: not a keys directory (no keys.json)", hint="create one with `edgellm keys init DIR`"
            )
        try:
            self.index: dict[str, Any] = json.loads(index.read_text())
        except (OSError, ValueError) as e:
            raise TrustError(f"{index}: unreadable ({e})", hint="restore the keys directory from its backup") from e

    def signers(self, role: str) -> list[Any]:
        out = []
        for entry in self.index["roles"].get(role, []):
            p = self.dir / entry["file"]
            if p.exists():
                out.append(_load_signer(p))
        if not out:
            raise TrustError(
                f"no private key for role {role!r} in {self.dir}",
                hint="the role's key is kept elsewhere (offline?): sign where it is",
            )
        return out

    def add_key(self, role: str) -> Any:
        key, signer = _new_signer()
        used = [e["file"] for e in self.index["roles"].get(role, [])]
        used += [e["file"] for e in self.index.get("retired", []) if e["role"] == role]
        n = 1 + max((int(f[len(role) + 1 : -len(".pem")]) for f in used), default=0)
        name = f"{role}-{n}.pem"
        _write_private_key(self.dir / name, key)
        self.index["roles"].setdefault(role, []).append({"file": name, "keyid": signer.public_key.keyid})
        self.save()
        return signer

    def retire(self, role: str, keyid: str) -> None:
        entries = self.index["roles"].get(role, [])
        for e in list(entries):
            if e["keyid"] == keyid:
                entries.remove(e)
                (self.dir / "retired").mkdir(exist_ok=True)
                src = self.dir / e["file"]
                if src.exists():
                    os.replace(src, self.dir / "retired" / e["file"])
                self.index.setdefault("retired", []).append({"role": role, **e})
        self.save()

    def save(self) -> None:
        atomic_write(self.dir / "keys.json", (json.dumps(self.index, indent=2, sort_keys=True) + "\n").encode())


def init_keys(
    keys_dir: str | Path,
    *,
    thresholds: dict[str, int] | None = None,
    counts: dict[str, int] | None = None,
    expiry: ExpiryPolicy = ExpiryPolicy(),
) -> Path:
    """Create Ed25519 keys for every role and the version-1 ``root.json`` devices pin.

    ``counts[role]`` keys are made for each role (default 1) and ``thresholds[role]`` of them
    must sign (default 1). Returns the path of ``root.json``.
    """
    from tuf.api.metadata import Metadata, Root

    thresholds = {r: 1 for r in ROLES} | (thresholds or {})
    counts = {r: max(1, thresholds[r]) for r in ROLES} | (counts or {})
    for r in ROLES:
        if not 1 <= thresholds[r] <= counts[r]:
            raise TrustError(
                f"role {r}: threshold {thresholds[r]} must be between 1 and its key count {counts[r]}",
                hint="raise --count or lower --threshold for that role",
            )
    d = Path(keys_dir)
    if (d / "keys.json").exists():
        raise TrustError(
            f"{d} already holds keys", hint="use a new directory, or `edgellm repo rotate-key` to change keys"
        )
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    root = Root(expires=now() + expiry.root, consistent_snapshot=True)
    index: dict[str, Any] = {"format": "edgellm-keys", "version": 1, "roles": {}, "expiry": expiry.to_dict()}
    root_signers = []
    for role in ROLES:
        for i in range(counts[role]):
            key, signer = _new_signer()
            name = f"{role}-{i + 1}.pem"
            _write_private_key(d / name, key)
            root.add_key(signer.public_key, role)
            index["roles"].setdefault(role, []).append({"file": name, "keyid": signer.public_key.keyid})
            if role == "root":
                root_signers.append(signer)
        root.roles[role].threshold = thresholds[role]
    md = Metadata(root)
    for s in root_signers:
        md.sign(s, append=True)
    atomic_write(d / "keys.json", (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    atomic_write(d / "root.json", serialize(md))
    logger.info("created keys in %s", d)
    return d / "root.json"


def copy_online_keys(keys_dir: str | Path, dest: str | Path) -> Path:
    """Copy a keys directory without the root's private keys: what a server may hold.

    ``dest`` gets ``keys.json``, ``root.json`` and the targets, snapshot and timestamp keys;
    the root keys stay where they are (keep them offline). Returns ``dest``.
    """
    src = KeyStore(keys_dir)
    d = Path(dest)
    if (d / "keys.json").exists():
        raise TrustError(f"{d} already holds keys", hint="use a new directory")
    if not (src.dir / "root.json").is_file():
        raise TrustError(f"{src.dir}: no root.json", hint="the keys directory made by `edgellm keys init` has one")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for role in ONLINE_ROLES:
        for e in src.index["roles"].get(role, []):
            if (src.dir / e["file"]).exists():
                atomic_write(d / e["file"], (src.dir / e["file"]).read_bytes(), mode=0o600)
    atomic_write(d / "root.json", (src.dir / "root.json").read_bytes())
    atomic_write(d / "keys.json", (json.dumps(src.index, indent=2, sort_keys=True) + "\n").encode())
    return d

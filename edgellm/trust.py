"""Keys, signed repositories and verification, built on python-tuf.

Two halves, as in python-tuf itself:

* **Repository side** (:func:`init_keys`, :class:`Repository`): Ed25519 keys made with
  ``cryptography``; TUF metadata written with python-tuf's Metadata API; bundles published as
  TUF targets whose ``custom`` field carries the ML facts (model, version, runtime,
  quantization, profiles, quality metrics). Layout of a repository directory::

      metadata/1.root.json … N.root.json, root.json (copy of the newest)
      metadata/N.targets.json, N.snapshot.json, timestamp.json (+ unversioned copies)
      targets/<sha256>.<bundle file name>            (consistent snapshots)

  It is served as static files: ``<url>/metadata/`` and ``<url>/targets/``.

* **Device side** (:class:`TufClient`, :func:`verify_bundle_file`, :func:`verify_signed_bundle`):
  python-tuf's ngclient, bootstrapped from a pinned ``root.json`` that is read from a
  read-only place; the writable metadata cache is never trusted on its own. Every download
  has a size cap and a finite timeout. Nothing here parses a bundle before its hash and
  length were checked against signed metadata.

A *signed bundle* (the file a device can install offline) is a deterministic tar holding a
tiny TUF repository: ``envelope.json`` (an unsigned hint), the metadata chain, and the bundle
as its one target. It is verified exactly like an online update.

Errors: :class:`~edgellm.errors.VerificationError` when signed metadata or a file is refused
(the other side's fault), :class:`FetchError` when bytes could not be fetched (the network's).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from edgellm._fs import atomic_write, sha256_file
from edgellm.bundle import UnpackLimits, _check_member, _extract_member, _iter_members, _open_tar, _tarinfo
from edgellm.errors import BundleError, TrustError, VerificationError

logger = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")
ENVELOPE_NAME = "envelope.json"
ENVELOPE_FORMAT = "edgellm-signed-bundle"


class FetchError(TrustError):
    """Metadata or a target could not be fetched (network, missing server, timeout)."""


# --------------------------------------------------------------------------- policy


@dataclasses.dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=30)
    timestamp: timedelta = timedelta(days=7)

    def for_role(self, role: str) -> timedelta:
        return getattr(self, role)

    def to_dict(self) -> dict[str, float]:
        return {r: self.for_role(r).total_seconds() for r in ROLES}

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> ExpiryPolicy:
        return cls(**{r: timedelta(seconds=float(d[r])) for r in ROLES if r in d})


def parse_duration(text: str) -> timedelta:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` -> timedelta."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return timedelta(seconds=float(t[:-1]) * units[t[-1]])
        return timedelta(seconds=float(t))
    except ValueError:
        raise TrustError(f"cannot read duration {text!r}", hint="write e.g. 30s, 15m, 12h, 7d or 2w") from None


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


# --------------------------------------------------------------------------- keys


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
        raise TrustError(f"{path}: cannot load private key ({e})", hint="check the keys directory made by `edgellm keys init`") from e
    return CryptoSigner(key)


class KeyStore:
    """A directory of role keys: ``<role>-<n>.pem`` (0600) plus ``keys.json`` (the public index)."""

    def __init__(self, keys_dir: str | Path) -> None:
        self.dir = Path(keys_dir)
        index = self.dir / "keys.json"
        if not index.is_file():
            raise TrustError(f"{self.dir}: not a keys directory (no keys.json)", hint="create one with `edgellm keys init DIR`")
        self.index: dict[str, Any] = json.loads(index.read_text())

    def signers(self, role: str) -> list[Any]:
        out = []
        for entry in self.index["roles"].get(role, []):
            p = self.dir / entry["file"]
            if p.exists():
                out.append(_load_signer(p))
        if not out:
            raise TrustError(f"no private key for role {role!r} in {self.dir}", hint="the role's key is kept elsewhere (offline?): sign where it is")
        return out

    def add_key(self, role: str) -> Any:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from securesystemslib.signer import CryptoSigner

        key = Ed25519PrivateKey.generate()
        signer = CryptoSigner(key)
        used = [e["file"] for e in self.index["roles"].get(role, [])]
        used += [e["file"] for e in self.index.get("retired", []) if e["role"] == role]
        n = 1 + max((int(f[len(role) + 1:-len(".pem")]) for f in used), default=0)
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
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, Root

    thresholds = {r: 1 for r in ROLES} | (thresholds or {})
    counts = {r: max(1, thresholds[r]) for r in ROLES} | (counts or {})
    for r in ROLES:
        if not 1 <= thresholds[r] <= counts[r]:
            raise TrustError(f"role {r}: threshold {thresholds[r]} must be between 1 and its key count {counts[r]}",
                             hint="raise --count or lower --threshold for that role")
    d = Path(keys_dir)
    if (d / "keys.json").exists():
        raise TrustError(f"{d} already holds keys", hint="use a new directory, or `edgellm repo rotate-key` to change keys")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    root = Root(expires=_now() + expiry.root, consistent_snapshot=True)
    index: dict[str, Any] = {"format": "edgellm-keys", "version": 1, "roles": {}, "expiry": expiry.to_dict()}
    root_signers = []
    for role in ROLES:
        for i in range(counts[role]):
            key = Ed25519PrivateKey.generate()
            signer = CryptoSigner(key)
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
    data = _serialize(md)
    atomic_write(d / "root.json", data)
    logger.info("created keys in %s", d)
    return d / "root.json"


def _serialize(md: Any) -> bytes:
    from tuf.api.serialization.json import JSONSerializer

    return md.to_bytes(JSONSerializer(compact=False))


# --------------------------------------------------------------------------- repository


@dataclasses.dataclass(frozen=True)
class TargetSummary:
    name: str
    length: int
    sha256: str
    custom: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def canonical_safe(obj: Any) -> Any:
    """TUF signs canonical JSON, which has no floats: floats become decimal strings."""
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, dict):
        return {str(k): canonical_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical_safe(v) for v in obj]
    return obj


def target_custom(manifest: Any, bundle_sha256: str) -> dict[str, Any]:
    """The ML facts a published target carries in its TUF ``custom`` field.

    Metric values are decimal strings (canonical JSON has no floats)."""
    return canonical_safe({
        "edgellm": {
            "name": manifest.name,
            "version": manifest.version,
            "runtime": manifest.runtime,
            "quantization": manifest.quantization,
            "profiles": list(manifest.profiles),
            "metrics": dict(manifest.metrics),
            "memory": manifest.memory.to_dict(),
            "bundle_sha256": bundle_sha256,
        }
    })


class Repository:
    """A signed TUF repository on disk, for publishing bundles."""

    def __init__(self, repo_dir: str | Path, keys_dir: str | Path | None = None, *, _creating: bool = False) -> None:
        self.dir = Path(repo_dir)
        self.metadata_dir = self.dir / "metadata"
        self.targets_dir = self.dir / "targets"
        if not _creating and not (self.metadata_dir / "timestamp.json").is_file():
            raise TrustError(f"{self.dir}: not an edgellm repository", hint="create one with `edgellm repo init DIR --keys KEYS`")
        cfg_path = self.dir / "repository.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.expiry = ExpiryPolicy.from_dict(self.config.get("expiry", {}))
        self.keys = KeyStore(keys_dir) if keys_dir is not None else None

    # ---- creation

    @classmethod
    def create(cls, repo_dir: str | Path, keys_dir: str | Path, *, expiry: ExpiryPolicy | None = None) -> Repository:
        from tuf.api.metadata import Metadata, MetaFile, Snapshot, Targets, Timestamp

        d = Path(repo_dir)
        if (d / "metadata" / "timestamp.json").exists():
            raise TrustError(f"{d} is already a repository", hint="use `edgellm repo add` to publish into it")
        keys = KeyStore(keys_dir)
        if expiry is None:
            expiry = ExpiryPolicy.from_dict(keys.index.get("expiry", {}))
        root_bytes = (Path(keys_dir) / "root.json").read_bytes()
        root_md = Metadata.from_bytes(root_bytes)
        (d / "metadata").mkdir(parents=True, exist_ok=True)
        (d / "targets").mkdir(parents=True, exist_ok=True)
        atomic_write(d / "repository.json", (json.dumps({"format": "edgellm-repository", "version": 1, "expiry": expiry.to_dict()}, indent=2) + "\n").encode())
        atomic_write(d / "metadata" / f"{root_md.signed.version}.root.json", root_bytes)
        atomic_write(d / "metadata" / "root.json", root_bytes)
        now = _now()
        targets = Metadata(Targets(expires=now + expiry.targets))
        snapshot = Metadata(Snapshot(expires=now + expiry.snapshot))
        snapshot.signed.meta["targets.json"] = MetaFile(version=1)
        timestamp = Metadata(Timestamp(expires=now + expiry.timestamp))
        timestamp.signed.snapshot_meta = MetaFile(version=1)
        repo = cls(d, keys_dir, _creating=True)
        repo._write("targets", targets)
        repo._write("snapshot", snapshot)
        repo._write("timestamp", timestamp)
        return repo

    # ---- reading

    def load(self, role: str) -> Any:
        from tuf.api.metadata import Metadata

        return Metadata.from_file(str(self.metadata_dir / f"{role}.json"))

    def list_targets(self) -> list[TargetSummary]:
        t = self.load("targets").signed
        return [
            TargetSummary(name, tf.length, tf.hashes.get("sha256", ""), dict(tf.unrecognized_fields.get("custom", {})))
            for name, tf in sorted(t.targets.items())
        ]

    def target_path(self, name: str) -> Path:
        tf = self.load("targets").signed.targets.get(name)
        if tf is None:
            raise TrustError(f"no target {name!r} in {self.dir}", hint="list targets with `edgellm repo list`")
        return self.targets_dir / f"{tf.hashes['sha256']}.{name}"

    # ---- writing

    def _require_keys(self) -> KeyStore:
        if self.keys is None:
            raise TrustError("this operation signs metadata and needs the keys", hint="pass --keys KEYS_DIR")
        return self.keys

    def _write(self, role: str, md: Any, signers: list[Any] | None = None) -> None:
        """Sign ``md`` with the role's keys (or ``signers``) and write it (versioned + plain)."""
        keys = self._require_keys()
        md.signatures.clear()
        for s in signers if signers is not None else keys.signers(role):
            md.sign(s, append=True)
        data = _serialize(md)
        if role == "timestamp":
            atomic_write(self.metadata_dir / "timestamp.json", data)
        else:
            atomic_write(self.metadata_dir / f"{md.signed.version}.{role}.json", data)
            atomic_write(self.metadata_dir / f"{role}.json", data)

    def _bump(self, md: Any, role: str) -> None:
        md.signed.version += 1
        md.signed.expires = _now() + self.expiry.for_role(role)

    def commit_targets(self, targets_md: Any, *, signers: list[Any] | None = None) -> None:
        """Write a new targets version, then a snapshot and a timestamp that point at it."""
        from tuf.api.metadata import MetaFile

        self._bump(targets_md, "targets")
        self._write("targets", targets_md, signers)
        snap = self.load("snapshot")
        snap.signed.meta["targets.json"] = MetaFile(version=targets_md.signed.version)
        self._bump(snap, "snapshot")
        self._write("snapshot", snap)
        self.refresh_timestamp(snapshot_version=snap.signed.version)

    def refresh_timestamp(self, snapshot_version: int | None = None) -> int:
        """Re-sign the timestamp (new version, new expiry). Run it more often than its expiry."""
        from tuf.api.metadata import MetaFile

        ts = self.load("timestamp")
        if snapshot_version is not None:
            ts.signed.snapshot_meta = MetaFile(version=snapshot_version)
        self._bump(ts, "timestamp")
        self._write("timestamp", ts)
        return ts.signed.version

    def add_bundle(self, bundle_path: str | Path, *, custom: dict[str, Any] | None = None, name: str | None = None) -> str:
        """Publish a bundle archive as a target. Returns the target name (the file name).

        A signed bundle (e.g. from another repository's ``edgellm build --repo``) is accepted
        too: the bundle inside it is published under its own name, re-signed by this repository.
        """
        if is_signed_bundle(bundle_path):
            with tempfile.TemporaryDirectory(prefix=".republish-", dir=self.dir) as tmp:
                inner = _extract_envelope(Path(bundle_path), Path(tmp), UnpackLimits())
                inner_name = inner.name.partition(".")[2]
                return self._add_plain(inner, custom=custom, name=name or inner_name)
        return self._add_plain(Path(bundle_path), custom=custom, name=name)

    def _add_plain(self, src: Path, *, custom: dict[str, Any] | None, name: str | None) -> str:
        from tuf.api.metadata import TargetFile

        from edgellm.bundle import read_manifest

        manifest = read_manifest(src)
        name = name or src.name
        digest = sha256_file(src)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        dst = self.targets_dir / f"{digest}.{name}"
        if not dst.exists():
            tmp = dst.with_name(f".{dst.name}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        tf = TargetFile.from_file(name, str(dst), ["sha256"])
        tf.unrecognized_fields["custom"] = canonical_safe(custom) if custom is not None else target_custom(manifest, digest)
        targets = self.load("targets")
        targets.signed.targets[name] = tf
        self.commit_targets(targets)
        logger.info("published %s (%s %s)", name, manifest.name, manifest.version)
        return name

    def remove_target(self, name: str) -> None:
        targets = self.load("targets")
        if targets.signed.targets.pop(name, None) is None:
            raise TrustError(f"no target {name!r}", hint="list targets with `edgellm repo list`")
        self.commit_targets(targets)

    def rotate_key(self, role: str) -> str:
        """Replace every key of ``role`` by a new one; returns the new key id.

        A new root version is signed by the old *and* the new root keys, so devices that pin
        an older root follow the chain. The role's metadata is re-signed with the new key.
        """
        from tuf.api.metadata import Metadata

        if role not in ROLES:
            raise TrustError(f"unknown role {role!r}", hint=f"choose one of {', '.join(ROLES)}")
        keys = self._require_keys()
        root_md = Metadata.from_bytes((self.metadata_dir / "root.json").read_bytes())
        root = root_md.signed
        old_root_signers = keys.signers("root")
        old_ids = list(root.roles[role].keyids)
        threshold = root.roles[role].threshold
        new_signers = [keys.add_key(role) for _ in range(max(threshold, len(old_ids)))]
        for kid in old_ids:
            root.revoke_key(kid, role)
        for s in new_signers:
            root.add_key(s.public_key, role)
        root.version += 1
        root.expires = _now() + self.expiry.root
        root_md.signatures.clear()
        signers = old_root_signers + (new_signers if role == "root" else [])
        for s in signers:
            root_md.sign(s, append=True)
        data = _serialize(root_md)
        atomic_write(self.metadata_dir / f"{root.version}.root.json", data)
        atomic_write(self.metadata_dir / "root.json", data)
        if self.keys is not None and (self.keys.dir / "root.json").exists():
            atomic_write(self.keys.dir / "root.json", data)
        for kid in old_ids:
            keys.retire(role, kid)
        # Re-sign what the rotated role signs so clients see it signed by the new key.
        if role == "targets":
            self.commit_targets(self.load("targets"))
        elif role == "snapshot":
            snap = self.load("snapshot")
            self._bump(snap, "snapshot")
            self._write("snapshot", snap)
            self.refresh_timestamp(snapshot_version=snap.signed.version)
        elif role == "timestamp":
            self.refresh_timestamp()
        return new_signers[0].public_key.keyid

    def export_signed(self, name: str, out: str | Path) -> Path:
        """Write a signed bundle: the metadata chain plus the target, for offline install."""
        tf = self.load("targets").signed.targets.get(name)
        if tf is None:
            raise TrustError(f"no target {name!r} in {self.dir}", hint="publish it with `edgellm repo add` first")
        snap_v = self.load("snapshot").signed.version
        targets_v = self.load("targets").signed.version
        root_v = self.load("root").signed.version
        entries: list[tuple[str, Path]] = [(f"metadata/{v}.root.json", self.metadata_dir / f"{v}.root.json") for v in range(1, root_v + 1)]
        entries += [
            ("metadata/timestamp.json", self.metadata_dir / "timestamp.json"),
            (f"metadata/{snap_v}.snapshot.json", self.metadata_dir / f"{snap_v}.snapshot.json"),
            (f"metadata/{targets_v}.targets.json", self.metadata_dir / f"{targets_v}.targets.json"),
        ]
        digest = tf.hashes["sha256"]
        entries.append((f"targets/{digest}.{name}", self.targets_dir / f"{digest}.{name}"))
        hint = json.dumps({"format": ENVELOPE_FORMAT, "version": 1, "target": name}, sort_keys=True).encode()
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                tar.addfile(_tarinfo(ENVELOPE_NAME, len(hint)), io.BytesIO(hint))
                for arc, path in entries:
                    with open(path, "rb") as f:
                        tar.addfile(_tarinfo(arc, path.stat().st_size), f)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out


# --------------------------------------------------------------------------- client side


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Bounds for every download a device makes (python-tuf style: finite everything)."""

    root_max_length: int = 512_000  # bytes
    timestamp_max_length: int = 16_384
    snapshot_max_length: int = 2_000_000
    targets_max_length: int = 5_000_000
    socket_timeout: int = 30  # seconds
    max_root_rotations: int = 64


def _local_fetcher() -> Any:
    """A python-tuf fetcher for repositories on the local file system (``file://`` URLs)."""
    from tuf.api.exceptions import DownloadHTTPError
    from tuf.ngclient.fetcher import FetcherInterface

    class LocalFetcher(FetcherInterface):
        def _fetch(self, url: str) -> Iterator[bytes]:
            path = Path(unquote(urlparse(url).path))
            try:
                f = open(path, "rb")
            except (FileNotFoundError, IsADirectoryError):
                raise DownloadHTTPError(f"{path} not found", 404) from None

            def chunks() -> Iterator[bytes]:
                with f:
                    yield from iter(lambda: f.read(1 << 20), b"")

            return chunks()

    return LocalFetcher()


def _as_url(location: str | Path) -> str:
    s = str(location)
    if s.startswith(("http://", "https://", "file://")):
        return s.rstrip("/") + "/"
    return Path(s).resolve().as_uri() + "/"


@dataclasses.dataclass(frozen=True)
class VerifiedTarget:
    """A bundle file whose length and sha256 matched signed, fresh TUF metadata."""

    name: str
    path: Path
    length: int
    sha256: str
    custom: dict[str, Any]

    @property
    def edgellm(self) -> dict[str, Any]:
        return dict(self.custom.get("edgellm", {}))


def _wrap(e: Exception, what: str) -> TrustError:
    from tuf.api import exceptions as tx

    if isinstance(e, tx.ExpiredMetadataError):
        return VerificationError(f"{what}: metadata has expired ({e})", hint="the repository must re-sign its timestamp/snapshot (`edgellm repo refresh`); check the device clock")
    if isinstance(e, tx.BadVersionNumberError):
        return VerificationError(f"{what}: metadata version went backwards or does not match ({e})", hint="possible rollback or mix-and-match attack: do not install; check the repository")
    if isinstance(e, tx.UnsignedMetadataError):
        return VerificationError(f"{what}: not enough valid signatures ({e})", hint="the metadata was not signed by the threshold of trusted keys: do not install")
    if isinstance(e, tx.LengthOrHashMismatchError):
        return VerificationError(f"{what}: length or hash differs from signed metadata ({e})", hint="the file was altered or corrupted: re-download it; do not install")
    if isinstance(e, tx.RepositoryError):
        return VerificationError(f"{what}: repository metadata refused ({type(e).__name__}: {e})", hint="do not install; check the repository")
    if isinstance(e, tx.DownloadError):
        return FetchError(f"{what}: download failed ({type(e).__name__}: {e})", hint="check the server URL and the network, then retry")
    return TrustError(f"{what}: {type(e).__name__}: {e}")


class TufClient:
    """A device's view of a repository: pinned root, bounded downloads, verified targets.

    ``root`` is the pinned trust root (path or bytes); ``cache_dir`` is the writable metadata
    cache (keeps rollback protection across runs). ``metadata_url``/``targets_url`` are
    ``http(s)://`` URLs or local directories.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        root: str | Path | bytes,
        metadata_url: str | Path,
        targets_url: str | Path,
        *,
        config: ClientConfig = ClientConfig(),
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(root, bytes):
            self._root = root
        else:
            try:
                self._root = Path(root).read_bytes()
            except OSError as e:
                raise TrustError(f"{root}: cannot read the pinned root ({e.strerror})", hint="provision the device with its fleet's root.json") from e
        self.metadata_url = _as_url(metadata_url)
        self.targets_url = _as_url(targets_url)
        self.config = config
        self._updater: Any = None

    def _make_updater(self) -> Any:
        from tuf.ngclient import Updater, UpdaterConfig
        from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

        cfg = UpdaterConfig(
            max_root_rotations=self.config.max_root_rotations,
            root_max_length=self.config.root_max_length,
            timestamp_max_length=self.config.timestamp_max_length,
            snapshot_max_length=self.config.snapshot_max_length,
            targets_max_length=self.config.targets_max_length,
            app_user_agent="edgellm",
        )
        if self.metadata_url.startswith("file://"):
            fetcher = _local_fetcher()
        else:
            fetcher = Urllib3Fetcher(socket_timeout=self.config.socket_timeout, app_user_agent="edgellm")
        dl = self.cache_dir / "downloads"
        dl.mkdir(exist_ok=True)
        return Updater(
            metadata_dir=str(self.cache_dir),
            metadata_base_url=self.metadata_url,
            target_dir=str(dl),
            target_base_url=self.targets_url,
            fetcher=fetcher,
            config=cfg,
            bootstrap=self._root,
        )

    def refresh(self) -> None:
        """Fetch and verify root chain, timestamp, snapshot, targets. Raises on any refusal."""
        try:
            self._updater = self._make_updater()
            self._updater.refresh()
        except Exception as e:
            self._updater = None
            raise _wrap(e, "refresh") from e

    def _trusted_targets(self) -> Any:
        if self._updater is None:
            self.refresh()
        # ngclient keeps the verified top-level targets in its trusted set.
        return self._updater._trusted_set.targets

    def targets(self) -> list[TargetSummary]:
        """Every top-level target of the verified metadata, with its custom ML facts."""
        t = self._trusted_targets()
        return [
            TargetSummary(name, tf.length, tf.hashes.get("sha256", ""), dict(tf.unrecognized_fields.get("custom", {})))
            for name, tf in sorted(t.targets.items())
        ]

    def _info(self, name: str) -> Any:
        if self._updater is None:
            self.refresh()
        try:
            info = self._updater.get_targetinfo(name)
        except Exception as e:
            raise _wrap(e, name) from e
        if info is None:
            raise VerificationError(f"{name}: not in the signed targets metadata", hint="publish it with `edgellm repo add`, or check the name")
        return info

    def download(self, name: str, dest_dir: str | Path, *, max_length: int | None = None) -> VerifiedTarget:
        """Download a target and verify its length and sha256 before returning its path."""
        info = self._info(name)
        if max_length is not None and info.length > max_length:
            raise VerificationError(f"{name}: {info.length} bytes is over this device's limit of {max_length}", hint="publish a smaller artifact for this profile")
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / name
        try:
            got = self._updater.download_target(info, filepath=str(path))
        except Exception as e:
            raise _wrap(e, name) from e
        return VerifiedTarget(name, Path(got), info.length, info.hashes["sha256"], dict(info.unrecognized_fields.get("custom", {})))

    def verify_file(self, path: str | Path, name: str | None = None) -> VerifiedTarget:
        """Check a local file against the signed metadata (by its target name, default its file name)."""
        p = Path(path)
        name = name or p.name
        info = self._info(name)
        try:
            with open(p, "rb") as f:
                info.verify_length_and_hashes(f)
        except OSError as e:
            raise TrustError(f"{p}: cannot read ({e.strerror})") from e
        except Exception as e:
            raise _wrap(e, name) from e
        return VerifiedTarget(name, p, info.length, info.hashes["sha256"], dict(info.unrecognized_fields.get("custom", {})))


def verify_bundle_file(
    path: str | Path,
    root: str | Path | bytes,
    repo: str | Path,
    *,
    target: str | None = None,
    cache_dir: str | Path | None = None,
) -> VerifiedTarget:
    """Verify a bundle file the way a device does: against ``repo`` (dir or URL) and a pinned root."""
    base = str(repo).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="edgellm-verify-") as tmp:
        client = TufClient(cache_dir or tmp, root, f"{base}/metadata", f"{base}/targets")
        client.refresh()
        return client.verify_file(path, target)


ENVELOPE_LIMITS = UnpackLimits(max_files=300, max_manifest_bytes=4096)


def is_signed_bundle(path: str | Path) -> bool:
    """True if ``path`` is a signed bundle (its first tar entry is ``envelope.json``)."""
    try:
        with open(path, "rb") as f:
            tar = _open_tar(f)
            first = tar.next()
            return first is not None and first.name == ENVELOPE_NAME
    except Exception:
        return False


def verify_signed_bundle(
    path: str | Path,
    root: str | Path | bytes,
    cache_dir: str | Path,
    out_dir: str | Path,
    *,
    limits: UnpackLimits = UnpackLimits(),
) -> VerifiedTarget:
    """Verify a signed bundle offline against the pinned ``root``.

    The envelope is opened with the same hostile-archive checks as a bundle (regular files
    under ``metadata/`` and ``targets/`` only, capped counts and sizes); its metadata goes
    through ngclient exactly as an online update would, advancing ``cache_dir`` (so rollback
    protection holds across online and offline installs). The verified bundle is moved to
    ``out_dir``; nothing of it is parsed here.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".envelope-", dir=out_dir) as tmp:
        t = Path(tmp)
        target_file = _extract_envelope(Path(path), t, limits)
        digest, _, name = target_file.name.partition(".")
        client = TufClient(cache_dir, root, t / "metadata", t / "targets")
        client.refresh()
        info = client._info(name)
        if info.hashes.get("sha256") != digest:
            raise VerificationError(f"{name}: the envelope's target is not the one the signed metadata names", hint="the signed bundle was altered: do not install")
        vt = client.verify_file(target_file, name)
        final = out_dir / name
        os.replace(target_file, final)
        return dataclasses.replace(vt, path=final)


def _extract_envelope(path: Path, dest: Path, limits: UnpackLimits) -> Path:
    target: Path | None = None
    total = 0
    count = 0
    with open(path, "rb") as f:
        tar = _open_tar(f)
        for m in _iter_members(tar):
            name = _check_member(m, ENVELOPE_LIMITS if m.name.startswith("metadata/") or m.name == ENVELOPE_NAME else limits)
            count += 1
            total += m.size
            if count > ENVELOPE_LIMITS.max_files or total > limits.max_total_bytes:
                raise VerificationError("signed bundle holds too many files or bytes: refused")
            top, _, rest = name.partition("/")
            if name == ENVELOPE_NAME:
                continue
            if top == "metadata" and "/" not in rest and rest.endswith(".json"):
                if m.size > ClientConfig().root_max_length:
                    raise VerificationError(f"{name}: metadata file too large: refused")
            elif top == "targets" and "/" not in rest and "." in rest:
                if target is not None:
                    raise VerificationError("signed bundle holds more than one target: refused")
            else:
                raise VerificationError(f"signed bundle entry {name!r} is not allowed: refused", hint="use a file written by `edgellm repo export` or `edgellm build --repo`")
            out = dest / name
            try:
                _extract_member(tar, m, out)
            except BundleError as e:
                raise VerificationError(f"signed bundle: {e}", hint="re-copy the file") from e
            if top == "targets":
                target = out
    if target is None:
        raise VerificationError(f"{path}: signed bundle holds no target", hint="use a file written by `edgellm repo export`")
    return target

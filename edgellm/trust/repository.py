"""The writer: a signed TUF repository on disk, for publishing bundles.

Layout (served as static files, ``<url>/metadata/`` and ``<url>/targets/``)::

    repository.json                      expiry policy
    .lock                                held (fcntl) by every writer
    metadata/1.root.json … N.root.json, root.json (copy of the newest)
    metadata/N.targets.json, N.snapshot.json, timestamp.json (+ unversioned copies)
    targets/<sha256>.<bundle file name>  (consistent snapshots)

Versions, expiry, snapshot and timestamp bookkeeping are python-tuf's
:class:`tuf.repository.Repository` (``edit_targets``, ``do_snapshot``, ``do_timestamp``); this
class stores what it signs. Every write runs in a :meth:`Repository.transaction`: it holds the
repository's lock file (so a periodic timestamp refresh cannot interleave with a publish) and
nothing reaches disk until the block ends without error. Then target files land first, the
versioned metadata next and ``timestamp.json`` last, so a client never sees metadata naming a
file that is not there yet; signed bundles exported inside the block appear after that.

Errors (from :mod:`edgellm.errors`)::

    EdgeLLMError
    ├── TrustError       not a repository, missing keys, unknown target or role, bad root
    └── BundleError      a published file is not a bundle (from :mod:`edgellm.bundle`)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.repository import Repository as TufRepository

from edgellm._fs import atomic_write, fsync_dir, sha256_file
from edgellm.errors import TrustError
from edgellm.trust.keys import ONLINE_ROLES, ROLES, ExpiryPolicy, KeyStore, now, serialize

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TargetSummary:
    name: str
    length: int
    sha256: str
    custom: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, targets: Targets) -> list[TargetSummary]:
        return [
            cls(name, tf.length, tf.hashes.get("sha256", ""), dict(tf.unrecognized_fields.get("custom", {})))
            for name, tf in sorted(targets.targets.items())
        ]


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
    """The ML facts a published target carries in its TUF ``custom`` field (metrics as decimal strings)."""
    out: dict[str, Any] = canonical_safe(
        {
            "edgellm": {
                "name": manifest.name,
                "version": manifest.version,
                "runtime": manifest.runtime,
                "quantization": manifest.quantization,
                "profiles": list(manifest.profiles),
                "metrics": dict(manifest.metrics),
                "memory": manifest.memory.to_dict(),
                "bundle_sha256": bundle_sha256,
                # what an adapter's base names: rollouts match it against what a device runs
                "artifact_sha256": manifest.file(manifest.artifact).sha256,
            }
        }
    )
    if manifest.extra.get("kind"):  # an adapter bundle: devices choose by the base it applies to
        out["edgellm"]["kind"] = str(manifest.extra["kind"])
        out["edgellm"]["base"] = canonical_safe(manifest.extra.get("base"))
    return out


def _order(filename: str) -> tuple[int, str]:
    """Commit order: roots, then targets (and the roles it delegates to), snapshot, and the
    timestamp last; versioned before plain."""
    role = filename.split(".")[-2]
    rank = -1 if role == "root" else ROLES.index(role if role in ROLES else "targets")
    return (rank, filename if filename[0].isdigit() else "~")


class Repository(TufRepository):
    """A signed TUF repository on disk, for publishing bundles."""

    def __init__(self, repo_dir: str | Path, keys_dir: str | Path | None = None, *, _creating: bool = False) -> None:
        self.dir = Path(repo_dir)
        self.metadata_dir = self.dir / "metadata"
        self.targets_dir = self.dir / "targets"
        if not _creating and not (self.metadata_dir / "timestamp.json").is_file():
            raise TrustError(
                f"{self.dir}: not an edgellm repository", hint="create one with `edgellm repo init DIR --keys KEYS`"
            )
        cfg_path = self.dir / "repository.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.expiry = ExpiryPolicy.from_dict(self.config.get("expiry", {}))
        self.keys = KeyStore(keys_dir) if keys_dir is not None else None
        self._mutex = threading.RLock()
        self._txn: _Txn | None = None
        self._signers: dict[str, list[Any]] = {}

    # ---- creation

    @classmethod
    def create(
        cls,
        repo_dir: str | Path,
        keys_dir: str | Path,
        *,
        expiry: ExpiryPolicy | None = None,
        root: bytes | str | Path | None = None,
    ) -> Repository:
        """A new, empty repository trusting ``root`` (default ``keys_dir/root.json``).

        ``keys_dir`` needs the private keys of targets, snapshot and timestamp only: the root
        may have been signed elsewhere (offline) and its keys never be here.
        """
        d = Path(repo_dir)
        if (d / "metadata" / "timestamp.json").exists():
            raise TrustError(f"{d} is already a repository", hint="use `edgellm repo add` to publish into it")
        keys = KeyStore(keys_dir)
        expiry = expiry or ExpiryPolicy.from_dict(keys.index.get("expiry", {}))
        root_bytes = root if isinstance(root, bytes) else Path(root or Path(keys_dir) / "root.json").read_bytes()
        root_md = _check_root(root_bytes, keys)
        d.mkdir(parents=True, exist_ok=True)
        repo = cls(d, keys_dir, _creating=True)
        repo.expiry = expiry
        with repo.transaction() as txn:
            txn.stage(f"{root_md.signed.version}.root.json", root_bytes)
            txn.stage("root.json", root_bytes)
            with repo.edit_targets():
                pass
            repo.do_snapshot()
            repo.do_timestamp()
            atomic_write(
                d / "repository.json",
                (
                    json.dumps({"format": "edgellm-repository", "version": 1, "expiry": expiry.to_dict()}, indent=2)
                    + "\n"
                ).encode(),
            )
        return repo

    # ---- python-tuf storage hooks

    def open(self, role: str) -> Metadata:
        data = self._read(f"{role}.json")
        if data is not None:
            return Metadata.from_bytes(data)
        expires = now() + self.expiry.for_role(_expiry_role(role))
        signed = {"snapshot": Snapshot, "timestamp": Timestamp}.get(role, Targets)(expires=expires)
        return Metadata(signed)

    def close(self, role: str, md: Metadata) -> None:
        """Sign ``md`` (new version, new expiry) with the role's keys and stage it."""
        txn = self._require_txn()
        if self._read(f"{role}.json") is not None:
            md.signed.version += 1
        md.signed.expires = now() + self.expiry.for_role(_expiry_role(role))
        md.signatures.clear()
        for s in self._signers.get(role) or self._require_keys().signers(role):
            md.sign(s, append=True)
        data = serialize(md)
        if role != "timestamp":
            txn.stage(f"{md.signed.version}.{role}.json", data)
        txn.stage(f"{role}.json", data)

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        """The top-level targets and every delegated targets role (e.g. the director) that exists."""
        infos = {"targets.json": MetaFile(version=self.targets().version)}
        delegations = self.targets().delegations
        for name in (delegations.roles or {}) if delegations is not None else ():
            if self._read(f"{name}.json") is not None:
                infos[f"{name}.json"] = MetaFile(version=self.targets(name).version)
        return infos

    @property
    def snapshot_info(self) -> MetaFile:
        return MetaFile(version=self.snapshot().version)

    # ---- reading

    def _staged(self) -> _Txn | None:
        """The open transaction, as seen from its own thread (other threads see the disk)."""
        txn = self._txn
        return txn if txn is not None and txn.owner == threading.get_ident() else None

    def _read(self, filename: str) -> bytes | None:
        txn = self._staged()
        if txn is not None and filename in txn.files:
            return txn.files[filename]
        try:
            return (self.metadata_dir / filename).read_bytes()
        except FileNotFoundError:
            return None

    def load(self, role: str) -> Metadata:
        if role not in ROLES:
            raise TrustError(f"unknown role {role!r}", hint=f"choose one of {', '.join(ROLES)}")
        if self._read(f"{role}.json") is None:
            raise TrustError(
                f"{self.dir}: no {role}.json", hint="the repository is incomplete: restore it from a backup"
            )
        return self.open(role)

    def list_targets(self) -> list[TargetSummary]:
        return TargetSummary.of(self.targets())

    def target_path(self, name: str) -> Path:
        tf = self.targets().targets.get(name)
        if tf is None:
            raise TrustError(f"no target {name!r} in {self.dir}", hint="list targets with `edgellm repo list`")
        blob = f"{tf.hashes['sha256']}.{name}"
        txn = self._staged()
        if txn is not None and blob in txn.blobs:
            return txn.blobs[blob]
        return self.targets_dir / blob

    # ---- writing

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Txn]:
        """Hold the repository lock; stage every write; commit them together at the end.

        Nested calls join the outer transaction. On an exception nothing is written.
        """
        with self._mutex:
            if self._txn is not None:
                yield self._txn
                return
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / ".lock", "a+b") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                txn = self._txn = _Txn(self)
                try:
                    yield txn
                    txn.commit()
                finally:
                    self._txn = None
                    txn.discard()

    def _require_txn(self) -> _Txn:
        if self._txn is None:
            raise TrustError("metadata is written only inside Repository.transaction()")
        return self._txn

    def _require_keys(self) -> KeyStore:
        if self.keys is None:
            raise TrustError("this operation signs metadata and needs the keys", hint="pass --keys KEYS_DIR")
        return self.keys

    def commit_targets(self, targets_md: Metadata, *, signers: list[Any] | None = None) -> None:
        """Write a new targets version, then a snapshot and a timestamp that point at it."""
        with self.transaction():
            self._signers = {"targets": signers} if signers is not None else {}
            try:
                self.close("targets", targets_md)
            finally:
                self._signers = {}
            self.do_snapshot()
            self.do_timestamp()

    def refresh_timestamp(self) -> int:
        """Re-sign the timestamp (new version, new expiry) over the newest snapshot."""
        with self.transaction():
            self.do_timestamp(force=True)
            return self.timestamp().version

    def add_bundle(
        self, bundle_path: str | Path, *, custom: dict[str, Any] | None = None, name: str | None = None
    ) -> str:
        """Publish a bundle archive as a target. Returns the target name (the file name).

        A signed bundle (e.g. from another repository's ``edgellm build --repo``) is accepted
        too: the bundle inside it is published under its own name, re-signed by this repository.
        """
        from edgellm.trust.envelope import extract_for_republish, is_signed_bundle

        with self.transaction() as txn:
            if is_signed_bundle(bundle_path):
                inner = extract_for_republish(Path(bundle_path), txn.stage_dir())
                return self._add_plain(inner, custom=custom, name=name or inner.name.partition(".")[2])
            return self._add_plain(Path(bundle_path), custom=custom, name=name)

    def _add_plain(self, src: Path, *, custom: dict[str, Any] | None, name: str | None) -> str:
        from edgellm.bundle import read_manifest

        manifest = read_manifest(src)
        name = name or src.name
        txn = self._require_txn()
        digest = sha256_file(src)
        staged = txn.add_blob(f"{digest}.{name}", src)
        tf = TargetFile.from_file(name, str(staged), ["sha256"])
        tf.unrecognized_fields["custom"] = (
            canonical_safe(custom) if custom is not None else target_custom(manifest, digest)
        )
        with self.edit_targets() as targets:
            targets.targets[name] = tf
        self.do_snapshot()
        self.do_timestamp()
        logger.info("published %s (%s %s)", name, manifest.name, manifest.version)
        return name

    def remove_target(self, name: str) -> None:
        with self.transaction():
            if name not in self.targets().targets:
                raise TrustError(f"no target {name!r}", hint="list targets with `edgellm repo list`")
            with self.edit_targets() as targets:
                del targets.targets[name]
            self.do_snapshot()
            self.do_timestamp()

    def rotate_key(self, role: str) -> str:
        """Replace every key of ``role`` by a new one; returns the new key id.

        A new root version is signed by the old *and* the new root keys, so devices that pin
        an older root follow the chain. The role's metadata is re-signed with the new key.
        """
        if role not in ROLES:
            raise TrustError(f"unknown role {role!r}", hint=f"choose one of {', '.join(ROLES)}")
        keys = self._require_keys()
        with self.transaction() as txn:
            root_md = self.open("root")
            root = root_md.signed
            assert isinstance(root, Root)
            old_root_signers = keys.signers("root")
            old_ids = list(root.roles[role].keyids)
            new_signers = [keys.add_key(role) for _ in range(max(root.roles[role].threshold, len(old_ids)))]
            for kid in old_ids:
                root.revoke_key(kid, role)
            for s in new_signers:
                root.add_key(s.public_key, role)
            root.version += 1
            root.expires = now() + self.expiry.root
            root_md.signatures.clear()
            for s in old_root_signers + (new_signers if role == "root" else []):
                root_md.sign(s, append=True)
            data = serialize(root_md)
            txn.stage(f"{root.version}.root.json", data)
            txn.stage("root.json", data)
            if (keys.dir / "root.json").exists():
                txn.after(lambda: atomic_write(keys.dir / "root.json", data))
            for kid in old_ids:
                keys.retire(role, kid)
            # Re-sign what the rotated role signs so clients see it signed by the new key.
            if role == "targets":
                with self.edit_targets():
                    pass
            self.do_snapshot(force=role == "snapshot")
            self.do_timestamp(force=role in ONLINE_ROLES)
        return str(new_signers[0].public_key.keyid)

    def export_signed(self, name: str, out: str | Path) -> Path:
        """Write a signed bundle (the metadata chain plus the target) for offline install.

        Inside a transaction the file appears only when the transaction commits.
        """
        from edgellm.trust.envelope import write_envelope

        with self.transaction() as txn:
            tf = self.targets().targets.get(name)
            if tf is None:
                raise TrustError(f"no target {name!r} in {self.dir}", hint="publish it with `edgellm repo add` first")
            out = Path(out)
            roots = [(f"{v}.root.json", self._read(f"{v}.root.json")) for v in range(1, self.root().version + 1)]
            rest = [
                ("timestamp.json", self._read("timestamp.json")),
                (f"{self.snapshot().version}.snapshot.json", self._read(f"{self.snapshot().version}.snapshot.json")),
                (f"{self.targets().version}.targets.json", self._read(f"{self.targets().version}.targets.json")),
            ]
            metadata = [(f, data) for f, data in roots + rest if data is not None]
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.")) / out.name
            txn.output(tmp, out)
            write_envelope(tmp, name, metadata, f"{tf.hashes['sha256']}.{name}", self.target_path(name))
        return out


def _check_root(root_bytes: bytes, keys: KeyStore) -> Metadata:
    """The root must be signed by its own threshold, and the keys dir must hold the online roles' keys."""
    try:
        md = Metadata.from_bytes(root_bytes)
        root = md.signed
        if not isinstance(root, Root):
            raise ValueError("not root metadata")
        root.verify_delegate("root", md.signed_bytes, md.signatures)
    except Exception as e:
        raise TrustError(
            f"the root metadata is not a validly signed root.json ({type(e).__name__}: {e})",
            hint="pass the root.json made by `edgellm keys init` (signed by the root keys)",
        ) from e
    for role in ONLINE_ROLES:
        ours = {e["keyid"] for e in keys.index["roles"].get(role, []) if (keys.dir / e["file"]).exists()}
        if len(ours & set(root.roles[role].keyids)) < root.roles[role].threshold:
            raise TrustError(
                f"{keys.dir} does not hold enough of the {role} keys the root trusts",
                hint="use the keys directory the root was made with (`edgellm keys copy-online`)",
            )
    return md


def _expiry_role(role: str) -> str:
    """Delegated targets roles expire like the top-level targets."""
    return role if role in ROLES else "targets"


class _Txn:
    """What one transaction stages: metadata files, target files, outputs, and follow-ups."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.owner = threading.get_ident()
        self.files: dict[str, bytes] = {}
        self.blobs: dict[str, Path] = {}
        self.outputs: list[tuple[Path, Path]] = []
        self.followups: list[Any] = []
        self._stage: Path | None = None

    def stage(self, filename: str, data: bytes) -> None:
        self.files[filename] = data

    def stage_dir(self) -> Path:
        if self._stage is None:
            self._stage = Path(tempfile.mkdtemp(dir=self.repo.dir, prefix=".staging-"))
        return self._stage

    def add_blob(self, blob: str, src: Path) -> Path:
        dst = self.repo.targets_dir / blob
        if blob in self.blobs or dst.exists():
            return self.blobs.get(blob, dst)
        staged = self.stage_dir() / blob
        if src.resolve().is_relative_to(self.stage_dir().resolve()):
            os.replace(src, staged)
        else:
            shutil.copyfile(src, staged)
        self.blobs[blob] = staged
        return staged

    def output(self, tmp: Path, final: Path) -> None:
        self.outputs.append((tmp, final))

    def after(self, fn: Any) -> None:
        self.followups.append(fn)

    def commit(self) -> None:
        if self.blobs:
            self.repo.targets_dir.mkdir(parents=True, exist_ok=True)
            for blob, staged in self.blobs.items():
                with open(staged, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(staged, self.repo.targets_dir / blob)
            fsync_dir(self.repo.targets_dir)
        for filename in sorted(self.files, key=_order):
            atomic_write(self.repo.metadata_dir / filename, self.files[filename])
        for fn in self.followups:
            fn()
        for tmp, final in self.outputs:
            os.replace(tmp, final)
            fsync_dir(final.parent)

    def discard(self) -> None:
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
        for tmp, _ in self.outputs:
            shutil.rmtree(tmp.parent, ignore_errors=True)

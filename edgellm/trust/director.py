"""Assignments: what each device should run, signed by the online ``director`` role.

Uptane's split, on python-tuf: the top-level targets role holds every published version (the
*image repository*) and delegates the paths ``assignments/device/*`` and ``assignments/group/*``
to a ``director`` role whose key is online on the server. Each assignment is a small JSON
target::

    assignments/device/<device id>.json   wins over the group's
    assignments/group/<group>.json

carrying an :class:`Assignment` (model, version, the artifact targets, a serial, the rollout
that made it, and — format v2 — up to :data:`MAX_ADAPTERS` LoRA adapter bundles layered on that
base, each an :class:`AssignedAdapter`). An assignment without adapters is written as v1, which
agents made before adapters existed read unchanged; one with adapters is v2, which they refuse
(and keep serving) rather than install the base alone. Devices fetch them with ngclient like any target, so the director's key and
threshold are checked against the device's pinned root chain, and snapshot/timestamp versions
make an older director metadata (a replayed assignment) refused. The serial is a second,
device-side guard: an assignment never goes back to a lower serial.

A repository made before assignments existed is upgraded by :func:`ensure_director`: a director
key is made in the server's keys directory and the targets role is re-signed (by the server's
online targets key) with the delegation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from typing import Any

from tuf.api.metadata import DelegatedRole, Delegations, TargetFile

from edgellm.errors import TrustError, VerificationError
from edgellm.ids import ID_RULE, valid_id
from edgellm.trust.repository import Repository

DIRECTOR = "director"
SCOPES = ("device", "group")
ASSIGNMENT_PATHS = [f"assignments/{s}/*" for s in SCOPES]
ASSIGNMENT_FORMAT = "edgellm-assignment"
#: the largest assignment file a device downloads
MAX_ASSIGNMENT_BYTES = 16_384
_MAX_TARGETS = 64
_MAX_SERIAL = 2**63 - 1
#: the most adapters one assignment layers on its base, and target paths per adapter
MAX_ADAPTERS = 8
_MAX_ADAPTER_TARGETS = 16
_VERSIONS = (1, 2)


def _target_names(v: Any, limit: int) -> bool:
    return (
        isinstance(v, list)
        and len(v) <= limit
        and all(isinstance(t, str) and 0 < len(t) <= 255 and "/" not in t for t in v)
    )


def assignment_path(scope: str, subject: str) -> str:
    """The target path of one assignment (``scope`` is ``device`` or ``group``)."""
    if scope not in SCOPES:
        raise TrustError(f"unknown assignment scope {scope!r}", hint=f"use one of {', '.join(SCOPES)}")
    if not valid_id(subject):
        raise TrustError(f"{scope} {subject!r} is not a valid id", hint=f"use {ID_RULE}")
    return f"assignments/{scope}/{subject}.json"


@dataclasses.dataclass(frozen=True)
class AssignedAdapter:
    """A LoRA adapter bundle an assignment layers on its base: the adapter's name and version
    and the target paths of its bundles (one per base artifact it was built for)."""

    name: str
    version: str
    targets: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Any) -> AssignedAdapter:
        """Typed and bounded; raises ValueError saying which part is wrong."""
        if not isinstance(d, dict) or set(d) - {"name", "version", "targets"}:
            raise ValueError("each adapter is {name, version, targets}")
        name, version, targets = d.get("name"), d.get("version"), d.get("targets", [])
        for what, v in (("name", name), ("version", version)):
            if not isinstance(v, str) or not valid_id(v):
                raise ValueError(f"adapter {what} must be {ID_RULE}")
        if not _target_names(targets, _MAX_ADAPTER_TARGETS):
            raise ValueError(f"adapter targets must be at most {_MAX_ADAPTER_TARGETS} target names")
        return cls(str(name), str(version), tuple(targets))


def _adapters(d: dict[str, Any]) -> tuple[AssignedAdapter, ...]:
    """The adapters of an assignment dict: only in v2, only on a base, bounded, names unique."""
    raw = d.get("adapters")
    if raw is None:
        return ()
    if d.get("v") != 2:
        raise ValueError("adapters need assignment format v2")
    if not isinstance(raw, list) or len(raw) > MAX_ADAPTERS:
        raise ValueError(f"adapters must be a list of at most {MAX_ADAPTERS}")
    if raw and d.get("version") is None:
        raise ValueError("adapters need a base model and version")
    out = tuple(AssignedAdapter.from_dict(a) for a in raw)
    if len({a.name for a in out}) != len(out):
        raise ValueError("adapter names must be unique")
    return out


@dataclasses.dataclass(frozen=True)
class Assignment:
    """One signed assignment. ``model``/``version`` None: nothing assigned at this scope (a
    device assignment may then only move the device to ``group``)."""

    scope: str
    subject: str
    serial: int
    model: str | None = None
    version: str | None = None
    targets: tuple[str, ...] = ()
    rollout: str | None = None
    group: str | None = None
    issued_at: float = 0.0
    adapters: tuple[AssignedAdapter, ...] = ()

    @property
    def path(self) -> str:
        return assignment_path(self.scope, self.subject)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        if not self.adapters:  # v1: what agents made before adapters existed read
            d.pop("adapters")
            return {"format": ASSIGNMENT_FORMAT, "v": 1, **d}
        d["adapters"] = [a.to_dict() for a in self.adapters]
        return {"format": ASSIGNMENT_FORMAT, "v": 2, **d}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: Any) -> Assignment:
        """Every field typed and bounded; anything else is a :class:`VerificationError`."""

        def bad(why: str) -> VerificationError:
            return VerificationError(
                f"assignment refused: {why}", hint="the director metadata is wrong: check the server"
            )

        if not isinstance(d, dict) or d.get("format") != ASSIGNMENT_FORMAT or d.get("v") not in _VERSIONS:
            raise bad("not an edgellm assignment (format/v)")
        scope, subject, serial = d.get("scope"), d.get("subject"), d.get("serial")
        if scope not in SCOPES or not isinstance(subject, str) or not valid_id(subject):
            raise bad("scope/subject")
        if type(serial) is not int or not 0 < serial <= _MAX_SERIAL:
            raise bad("serial must be a positive integer")
        ids = {k: d.get(k) for k in ("model", "version", "rollout", "group")}
        for k, v in ids.items():
            if v is not None and (not isinstance(v, str) or not valid_id(v)):
                raise bad(f"{k} must be {ID_RULE}")
        if (ids["model"] is None) != (ids["version"] is None):
            raise bad("model and version go together")
        targets = d.get("targets", [])
        if not _target_names(targets, _MAX_TARGETS):
            raise bad("targets must be a short list of target names")
        try:
            adapters = _adapters(d)
        except ValueError as e:
            raise bad(str(e)) from None
        issued = d.get("issued_at", 0.0)
        if not isinstance(issued, (int, float)) or isinstance(issued, bool) or not math.isfinite(issued):
            raise bad("issued_at must be a number")
        return cls(
            scope,
            subject,
            serial,
            ids["model"],
            ids["version"],
            tuple(targets),
            ids["rollout"],
            ids["group"],
            float(issued),
            adapters,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Assignment:
        if len(data) > MAX_ASSIGNMENT_BYTES:
            raise VerificationError(
                f"assignment of {len(data)} bytes is over {MAX_ASSIGNMENT_BYTES}",
                hint="the director metadata is wrong: check the server",
            )
        try:
            return cls.from_dict(json.loads(data))
        except ValueError as e:
            raise VerificationError(f"assignment is not JSON ({e})", hint="check the server") from None


# --------------------------------------------------------------------------- server side


def has_director(repo: Repository) -> bool:
    """The top-level targets delegates the assignment paths to a director key the server holds."""
    deleg = repo.targets().delegations
    role = (deleg.roles or {}).get(DIRECTOR) if deleg is not None else None
    if role is None or role.paths != ASSIGNMENT_PATHS or repo.keys is None:
        return False
    ours = {e["keyid"] for e in repo.keys.index["roles"].get(DIRECTOR, []) if (repo.keys.dir / e["file"]).exists()}
    return len(ours & set(role.keyids)) >= role.threshold


def ensure_director(repo: Repository) -> bool:
    """Make the director key and delegation if missing (upgrades older repositories: the
    targets role is re-signed with the server's online targets key). Returns True if it changed."""
    keys = repo._require_keys()
    with repo.transaction():
        if has_director(repo):
            return False
        signer = keys.add_key(DIRECTOR)
        with repo.edit_targets() as targets:
            targets.delegations = Delegations(
                keys={signer.public_key.keyid: signer.public_key},
                roles={DIRECTOR: DelegatedRole(DIRECTOR, [signer.public_key.keyid], 1, True, list(ASSIGNMENT_PATHS))},
            )
        with repo.edit_targets(DIRECTOR) as director:
            director.targets.clear()  # a re-made key starts from no assignments
        repo.do_snapshot()
        repo.do_timestamp()
    return True


def write_assignments(repo: Repository, changes: list[tuple[str, str, Assignment | None]]) -> int:
    """Set (or remove, with None) assignments ``(scope, subject, assignment)`` in one signed
    director version, then snapshot and timestamp. Each assignment's serial becomes the version
    of the director metadata that signs it (monotonic across removals). Returns that serial."""
    with repo.transaction() as txn:
        if not has_director(repo):
            raise TrustError(
                "the repository has no director role", hint="run `edgellm-server init` or start the server once"
            )
        with repo.edit_targets(DIRECTOR) as director:
            serial = director.version + 1
            for scope, subject, a in changes:
                path = assignment_path(scope, subject)
                if a is None:
                    director.targets.pop(path, None)
                    continue
                a = dataclasses.replace(a, serial=serial)
                data = a.to_json()
                digest = hashlib.sha256(data).hexdigest()
                folder, _, base = path.rpartition("/")
                blob = f"{folder}/{digest}.{base}"  # ngclient's consistent-snapshot name
                staged = txn.stage_dir() / blob.replace("/", "__")
                staged.write_bytes(data)
                (repo.targets_dir / folder).mkdir(parents=True, exist_ok=True)
                txn.blobs[blob] = staged
                tf = TargetFile(len(data), {"sha256": digest}, path)
                tf.unrecognized_fields["custom"] = {
                    "edgellm_assignment": a.to_dict() | {"issued_at": repr(a.issued_at)}
                }
                director.targets[path] = tf
        repo.do_snapshot()
        repo.do_timestamp()
    return serial


def read_assignments(repo: Repository) -> dict[str, Assignment]:
    """Every current assignment by target path (the server's own signed view)."""
    if repo._read(f"{DIRECTOR}.json") is None:
        return {}
    out = {}
    for path, tf in repo.targets(DIRECTOR).targets.items():
        d = dict(tf.unrecognized_fields.get("custom", {}).get("edgellm_assignment", {}))
        d["issued_at"] = float(d.get("issued_at") or 0.0)
        out[path] = Assignment.from_dict(d)
    return out


def new_assignment(
    scope: str,
    subject: str,
    *,
    model: str | None,
    version: str | None,
    targets: list[str] | tuple[str, ...] = (),
    rollout: str | None = None,
    group: str | None = None,
    adapters: tuple[AssignedAdapter, ...] | list[AssignedAdapter] = (),
) -> Assignment:
    """An assignment to write (its serial is set by :func:`write_assignments`)."""
    assignment_path(scope, subject)
    a = Assignment(scope, subject, 1, model, version, tuple(targets), rollout, group, time.time(), tuple(adapters))
    Assignment.from_dict(a.to_dict())  # the server never signs what a device would refuse
    return a


# --------------------------------------------------------------------------- device side


def fetch_assignment(client: Any, scope: str, subject: str, dest_dir: Any) -> Assignment | None:
    """The assignment at ``scope``/``subject`` verified by ngclient (director key and threshold
    from the pinned root chain, hash and length from the director's signed metadata), or None
    when there is none. ``client`` is a refreshed :class:`~edgellm.trust.client.TufClient`."""
    from pathlib import Path

    path = assignment_path(scope, subject)
    info = client.lookup(path)
    if info is None:
        return None
    vt = client.download(path, dest_dir, max_length=MAX_ASSIGNMENT_BYTES)
    try:
        a = Assignment.from_bytes(Path(vt.path).read_bytes())
    finally:
        Path(vt.path).unlink(missing_ok=True)
    if (a.scope, a.subject) != (scope, subject):
        raise VerificationError(
            f"{path} holds the assignment of {a.scope} {a.subject}",
            hint="the director metadata is wrong: check the server",
        )
    return a

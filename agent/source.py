"""Where verified bundles come from: the TUF repository online, or a signed envelope offline.

This is the only module that talks to :mod:`edgellm.trust`. Verification is done there (pure
python-tuf checks against the pinned root); this module adapts it to the small interface the
installer needs: ``refresh()``, ``targets()``, ``download(target, dest_dir) -> verified file``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Protocol


@dataclasses.dataclass
class TargetInfo:
    """A bundle target as described by the repository's signed targets metadata."""

    path: str
    name: str
    version: str
    runtime: str | None = None
    quantization: str | None = None
    profiles: list[str] = dataclasses.field(default_factory=list)
    length: int | None = None
    custom: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_custom(cls, path: str, custom: dict | None, length: int | None = None) -> TargetInfo:
        meta = dict((custom or {}).get("edgellm") or custom or {})
        profiles = meta.get("profiles") or ([meta["profile"]] if meta.get("profile") else [])
        return cls(
            path=path,
            name=str(meta.get("name") or ""),
            version=str(meta.get("version") or ""),
            runtime=meta.get("runtime"),
            quantization=meta.get("quantization"),
            profiles=list(profiles),
            length=length,
            custom=meta,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class UpdateSource(Protocol):
    def refresh(self) -> None: ...

    def targets(self) -> list[TargetInfo]: ...

    def download(self, target: TargetInfo, dest_dir: Path) -> Path: ...


def version_key(v: str) -> tuple:
    """Order versions: numeric parts numerically (1.10 > 1.9); a pre-release sorts before its release."""
    try:
        from packaging.version import InvalidVersion, Version

        try:
            return (1, Version(v))
        except InvalidVersion:
            pass
    except ImportError:  # pragma: no cover - packaging ships with pip/setuptools
        pass
    parts = re.split(r"[.\-+]", v)
    return (0, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))


def compare_versions(a: str, b: str) -> int:
    ka, kb = version_key(a), version_key(b)
    if ka[0] != kb[0]:
        return (a > b) - (a < b)
    return (ka > kb) - (ka < kb)


class TufSource:
    """Online updates from ``{server}/metadata/`` and ``{server}/targets/`` (python-tuf ngclient).

    The pinned root is read from the read-only ``trust/root.json``; ``trust/cache`` keeps the
    newest verified metadata so versions never go backwards across runs (and across offline
    installs, which advance the same cache).
    """

    def __init__(self, server: str, root: Path, cache_dir: Path, *, max_length: int | None = None) -> None:
        from edgellm.trust import TufClient

        base = server.rstrip("/")
        self.client = TufClient(cache_dir, root, f"{base}/metadata", f"{base}/targets")
        self.max_length = max_length

    def refresh(self) -> None:
        self.client.refresh()

    def targets(self) -> list[TargetInfo]:
        return [TargetInfo.from_custom(t.name, t.custom, t.length) for t in self.client.targets()]

    def download(self, target: TargetInfo, dest_dir: Path) -> Path:
        return Path(self.client.download(target.path, dest_dir, max_length=self.max_length).path)


def tuf_source(paths: Any, config: Any) -> TufSource:
    if not config.server:
        from agent.errors import AgentError

        raise AgentError(
            "this device has no update server configured",
            hint="re-provision with --server URL, or install bundles offline with `edgellm-agent install FILE`",
        )
    return TufSource(config.server, paths.trust_root, paths.tuf_cache, max_length=config.download_max_bytes)


def verify_envelope(envelope: Path, paths: Any, work_dir: Path) -> tuple[Path, TargetInfo]:
    """Verify a signed bundle file offline against the pinned root; returns the verified archive."""
    from edgellm.trust import verify_signed_bundle

    vt = verify_signed_bundle(envelope, paths.trust_root, paths.tuf_cache, work_dir)
    return Path(vt.path), TargetInfo.from_custom(vt.name, vt.custom, vt.length)


def fetch_assignment(source: TufSource, scope: str, subject: str, dest_dir: Path) -> Any:
    """The signed assignment at ``scope``/``subject`` (see :mod:`edgellm.trust.director`), or None."""
    from edgellm.trust.director import fetch_assignment as _fetch

    return _fetch(source.client, scope, subject, dest_dir)

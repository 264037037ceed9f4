"""The device side: python-tuf's ngclient ``Updater`` behind a small, bounded API.

The client is bootstrapped from a pinned ``root.json`` read from a read-only place; the
writable metadata cache is never trusted on its own. Every download has a size cap and a
finite timeout. Targets are listed from the ``targets.json`` ngclient has just verified and
cached (read back with the public Metadata API); nothing here parses a bundle before its hash
and length were checked against signed metadata.

Errors (from :mod:`edgellm.errors`; python-tuf's are translated by :func:`wrap_tuf_error`)::

    EdgeLLMError
    └── TrustError               anything else (unreadable pinned root, unexpected failure)
        ├── VerificationError    signed metadata or a file refused: the other side's fault
        └── FetchError           bytes could not be fetched: the network's fault
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from edgellm.errors import TrustError, VerificationError
from edgellm.trust.repository import TargetSummary

# The largest metadata file a device accepts, online or inside a signed bundle.
MAX_METADATA_BYTES = 5_000_000


class FetchError(TrustError):
    """Metadata or a target could not be fetched (network, missing server, timeout)."""


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Bounds for every download a device makes (python-tuf style: finite everything)."""

    root_max_length: int = 512_000  # bytes
    timestamp_max_length: int = 16_384
    snapshot_max_length: int = 2_000_000
    targets_max_length: int = MAX_METADATA_BYTES
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


# python-tuf exception name -> (our class, what it means, what to do); most specific first.
_TUF_ERRORS: tuple[tuple[str, type[TrustError], str, str], ...] = (
    (
        "ExpiredMetadataError",
        VerificationError,
        "metadata has expired",
        "the repository must re-sign its timestamp/snapshot (`edgellm repo refresh`); check the device clock",
    ),
    (
        "BadVersionNumberError",
        VerificationError,
        "metadata version went backwards or does not match",
        "possible rollback or mix-and-match attack: do not install; check the repository",
    ),
    (
        "UnsignedMetadataError",
        VerificationError,
        "not enough valid signatures",
        "the metadata was not signed by the threshold of trusted keys: do not install",
    ),
    (
        "LengthOrHashMismatchError",
        VerificationError,
        "length or hash differs from signed metadata",
        "the file was altered or corrupted: re-download it; do not install",
    ),
    ("RepositoryError", VerificationError, "repository metadata refused", "do not install; check the repository"),
    ("DownloadError", FetchError, "download failed", "check the server URL and the network, then retry"),
)


def wrap_tuf_error(e: Exception, what: str) -> TrustError:
    """python-tuf's exception as ours, with a hint saying what to do."""
    from tuf.api import exceptions as tx

    if isinstance(e, TrustError):
        return e
    for name, cls, meaning, hint in _TUF_ERRORS:
        if isinstance(e, getattr(tx, name)):
            return cls(f"{what}: {meaning} ({type(e).__name__}: {e})", hint=hint)
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
                raise TrustError(
                    f"{root}: cannot read the pinned root ({e.strerror})",
                    hint="provision the device with its fleet's root.json",
                ) from e
        self.metadata_url = _as_url(metadata_url)
        self.targets_url = _as_url(targets_url)
        self.config = config
        self._updater: Any = None
        self._targets: Any = None

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
        from tuf.api.metadata import Metadata

        try:
            self._updater = self._make_updater()
            self._updater.refresh()
            # ngclient persisted the targets metadata it just verified: read it back (public API)
            self._targets = Metadata.from_bytes((self.cache_dir / "targets.json").read_bytes()).signed
        except Exception as e:
            self._updater = self._targets = None
            raise wrap_tuf_error(e, "refresh") from e

    def targets(self) -> list[TargetSummary]:
        """Every top-level target of the verified metadata, with its custom ML facts."""
        if self._targets is None:
            self.refresh()
        return TargetSummary.of(self._targets)

    def info(self, name: str) -> Any:
        """The signed ``TargetFile`` for ``name`` (refreshing first if needed)."""
        if self._updater is None:
            self.refresh()
        try:
            info = self._updater.get_targetinfo(name)
        except Exception as e:
            raise wrap_tuf_error(e, name) from e
        if info is None:
            raise VerificationError(
                f"{name}: not in the signed targets metadata",
                hint="publish it with `edgellm repo add`, or check the name",
            )
        return info

    def lookup(self, name: str) -> Any | None:
        """The signed ``TargetFile`` for ``name`` from the top-level targets or a role it
        delegates to (e.g. the director's assignments), or None when no role lists it."""
        if self._updater is None:
            self.refresh()
        try:
            return self._updater.get_targetinfo(name)
        except Exception as e:
            raise wrap_tuf_error(e, name) from e

    def download(self, name: str, dest_dir: str | Path, *, max_length: int | None = None) -> VerifiedTarget:
        """Download a target and verify its length and sha256 before returning its path."""
        info = self.info(name)
        if max_length is not None and info.length > max_length:
            raise VerificationError(
                f"{name}: {info.length} bytes is over this device's limit of {max_length}",
                hint="publish a smaller artifact for this profile",
            )
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            got = self._updater.download_target(info, filepath=str(dest / name.replace("/", "__")))
        except Exception as e:
            raise wrap_tuf_error(e, name) from e
        return VerifiedTarget(
            name, Path(got), info.length, info.hashes["sha256"], dict(info.unrecognized_fields.get("custom", {}))
        )

    def verify_file(self, path: str | Path, name: str | None = None) -> VerifiedTarget:
        """Check a local file against the signed metadata (by its target name, default its file name)."""
        p = Path(path)
        name = name or p.name
        info = self.info(name)
        try:
            with open(p, "rb") as f:
                info.verify_length_and_hashes(f)
        except OSError as e:
            raise TrustError(f"{p}: cannot read ({e.strerror})") from e
        except Exception as e:
            raise wrap_tuf_error(e, name) from e
        return VerifiedTarget(
            name, p, info.length, info.hashes["sha256"], dict(info.unrecognized_fields.get("custom", {}))
        )


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

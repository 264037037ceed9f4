"""Tar archives: the one writer and the one hostile-input reader for bundles and signed bundles.

Writing (:func:`write_archive`) is deterministic: PAX format (long member names work), sorted by
the caller, fixed mtime, owners, modes; the same inputs give the same bytes. The file appears
atomically and durably.

Reading (:class:`MemberGuard`, :func:`read_member`, :func:`extract_member`) assumes an attacker
wrote the archive: only regular, non-sparse files with safe relative names (each path part at
most :data:`MAX_NAME_PART` characters) are let through, each name once, no name both a file and
a directory, counts and sizes capped, and no member is ever written past the length the caller
allows, so a member cannot grow on disk beyond what the caller expected.

Errors (from :mod:`edgellm.errors`)::

    EdgeLLMError
    └── BundleError      every refusal: bad member, over a limit, truncated or not a tar
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from edgellm._fs import atomic_file
from edgellm.errors import BundleError

_CHUNK = 1 << 20
_PATH_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
MAX_NAME_PART = 255  # NAME_MAX on the file systems a device extracts to
MAX_NAME = 1024
REBUILD_HINT = "re-download the file, or rebuild it with `edgellm bundle pack` / `edgellm repo export`"


def name_problem(p: object) -> str | None:
    """Why ``p`` cannot be a member name, naming it (``None`` when it can): a relative path of
    ``[A-Za-z0-9._-]`` parts, no ``.``/``..``, each part short enough for a file system."""
    shown = repr(p if not isinstance(p, str) or len(p) <= 60 else p[:60] + "…")
    if not isinstance(p, str) or not _PATH_RE.match(p) or any(part in (".", "..") for part in p.split("/")):
        return f"{shown} is not a relative path of [A-Za-z0-9._-] names"
    longest = max(len(part) for part in p.split("/"))
    if len(p) > MAX_NAME or longest > MAX_NAME_PART:
        return (
            f"{shown} is too long ({len(p)} characters, its longest part {longest}; the limits are "
            f"{MAX_NAME_PART} per part and {MAX_NAME} in all)"
        )
    return None


def safe_relpath(p: object) -> bool:
    return name_problem(p) is None


def tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """A member header with nothing that varies between machines or runs."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def write_archive(out: Path, entries: Iterable[tuple[str, bytes | Path]]) -> Path:
    """Write ``entries`` (member name, bytes or a file to copy), in the given order, to ``out``."""
    with (
        atomic_file(out) as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar,
    ):
        for name, src in entries:
            if isinstance(src, bytes):
                tar.addfile(tarinfo(name, len(src)), io.BytesIO(src))
            else:
                with open(src, "rb") as f:
                    tar.addfile(tarinfo(name, os.fstat(f.fileno()).st_size), f)
    return out


def open_tar(fileobj: BinaryIO) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=fileobj, mode="r:")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BundleError(
            f"not a bundle archive ({e})", hint="pass a file written by `edgellm bundle pack` or `edgellm build`"
        ) from e


def check_member(m: tarfile.TarInfo, max_file_bytes: int) -> str:
    """Refuse anything but a regular file with a safe name; return the name."""
    name = m.name
    if m.issym() or m.islnk():
        raise BundleError(f"bundle entry {name!r} is a link: links are refused", hint=REBUILD_HINT)
    if m.isdir():
        raise BundleError(f"bundle entry {name!r} is a directory entry: bundles hold files only", hint=REBUILD_HINT)
    if not m.isreg():
        raise BundleError(f"bundle entry {name!r} is a device, fifo or other special file: refused", hint=REBUILD_HINT)
    if m.issparse():
        raise BundleError(
            f"bundle entry {name!r} is a sparse file (its stored bytes differ from its size): refused",
            hint=REBUILD_HINT,
        )
    if name.startswith("/") or posixpath.isabs(name) or "\\" in name:
        raise BundleError(f"bundle entry {name!r} has an absolute path: refused", hint=REBUILD_HINT)
    if ".." in name.split("/"):
        raise BundleError(f"bundle entry {name!r} escapes the bundle with '..': refused", hint=REBUILD_HINT)
    problem = name_problem(name)
    if problem is not None:
        raise BundleError(
            f"bundle entry name {problem}: refused",
            hint="use shorter [A-Za-z0-9._-] names in the source directory and pack again",
        )
    if m.size > max_file_bytes:
        raise BundleError(
            f"bundle entry {name!r} is {m.size} bytes, over the {max_file_bytes}-byte limit", hint=REBUILD_HINT
        )
    return name


class MemberGuard:
    """Walks an archive's members, refusing each one that could not be extracted cleanly.

    Every member passes :func:`check_member`; names are unique, none is both a file and the
    directory of another file; at most ``max_files`` members and ``max_total_bytes`` bytes.
    """

    def __init__(self, *, max_files: int, max_total_bytes: int) -> None:
        self.max_files = max_files
        self.max_total_bytes = max_total_bytes
        self.files: set[str] = set()
        self.dirs: set[str] = set()
        self.total = 0

    def members(self, tar: tarfile.TarFile, max_file_bytes: int) -> Iterator[tarfile.TarInfo]:
        while True:
            try:
                m = tar.next()
            except (tarfile.TarError, EOFError, OSError, UnicodeError) as e:
                raise BundleError(f"bundle archive is truncated or corrupted ({e})", hint=REBUILD_HINT) from e
            if m is None:
                return
            self.admit(m, max_file_bytes)
            yield m

    def admit(self, m: tarfile.TarInfo, max_file_bytes: int) -> str:
        name = check_member(m, max_file_bytes)
        if name in self.files:
            raise BundleError(f"bundle entry {name!r} appears twice: refused", hint=REBUILD_HINT)
        parents = ["/".join(name.split("/")[:i]) for i in range(1, name.count("/") + 1)]
        if name in self.dirs or any(p in self.files for p in parents):
            clash = name if name in self.dirs else next(p for p in parents if p in self.files)
            raise BundleError(
                f"bundle entry {name!r}: {clash!r} is both a file and a directory in this archive: refused",
                hint=REBUILD_HINT,
            )
        if len(self.files) + 1 > self.max_files:
            raise BundleError(f"bundle has more than {self.max_files} files: refused", hint=REBUILD_HINT)
        self.total += m.size
        if self.total > self.max_total_bytes:
            raise BundleError(f"bundle holds more than {self.max_total_bytes} bytes: refused", hint=REBUILD_HINT)
        self.files.add(name)
        self.dirs.update(parents)
        return name


def read_member(tar: tarfile.TarFile, m: tarfile.TarInfo, max_bytes: int) -> bytes:
    """The bytes of a small member (a manifest), at most ``max_bytes``."""
    if m.size > max_bytes:
        raise BundleError(f"{m.name} is {m.size} bytes, over the {max_bytes}-byte limit", hint=REBUILD_HINT)
    src = tar.extractfile(m)
    assert src is not None
    try:
        data = src.read(m.size)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BundleError(f"bundle archive is truncated inside {m.name!r} ({e})", hint=REBUILD_HINT) from e
    if len(data) != m.size:
        raise BundleError(f"bundle archive is truncated inside {m.name!r}", hint=REBUILD_HINT)
    return data


def extract_member(tar: tarfile.TarFile, m: tarfile.TarInfo, out_path: Path, *, max_bytes: int) -> tuple[str, int]:
    """Stream a member (admitted by :class:`MemberGuard`) into a new file; return its sha256 and length.

    Refuses before writing anything when the header says more than ``max_bytes``, and never
    writes more than ``max_bytes`` whatever the stream yields.
    """
    if m.size > max_bytes:
        raise BundleError(
            f"{m.name!r} is {m.size} bytes, more than the {max_bytes} expected: refused", hint=REBUILD_HINT
        )
    src = tar.extractfile(m)
    assert src is not None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    n = 0
    try:
        with open(out_path, "xb") as out:
            while n < m.size and (chunk := src.read(min(_CHUNK, m.size - n))):
                n += len(chunk)
                h.update(chunk)
                out.write(chunk)
    except (tarfile.TarError, EOFError) as e:
        raise BundleError(f"bundle archive is truncated inside {m.name!r} ({e})", hint=REBUILD_HINT) from e
    except OSError as e:
        raise BundleError(
            f"cannot write {out_path.name} ({e.strerror})",
            hint="check the free space and permissions of the destination",
        ) from e
    if n != m.size:
        raise BundleError(f"bundle archive is truncated inside {m.name!r}", hint=REBUILD_HINT)
    return h.hexdigest(), n

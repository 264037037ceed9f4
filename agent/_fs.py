"""Small filesystem helpers of the agent: JSON on top of the one atomic write, private files,
tree removal and advisory locks.

Every file the agent relies on after a crash (config, slot pointer, keys) is written with
:func:`edgellm._fs.atomic_write` (temp file in the same directory, fsync, ``os.replace``, fsync
of the directory): a kill at any instant leaves either the old or the new content, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.errors import LockTimeout
from edgellm._fs import atomic_write, fsync_dir, sha256_file  # noqa: F401 (re-exported)


def atomic_write_json(path: str | Path, obj: Any, *, mode: int = 0o644) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


def read_json(path: str | Path) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def create_private_file(path: str | Path, data: bytes, *, mode: int = 0o600) -> None:
    """Create ``path`` (must not exist) with ``mode`` from the first byte on (no chmod window)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # umask may have removed bits we asked for


def remove_tree(path: str | Path) -> None:
    """Remove a file or directory tree if it exists (also read-only entries)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.exists():
        return

    def _onerror(func, p, exc_info):
        with contextlib.suppress(OSError):
            os.chmod(p, 0o700)
            os.chmod(os.path.dirname(p), 0o700)
        func(p)

    shutil.rmtree(path, onerror=_onerror)


@contextlib.contextmanager
def file_lock(path: str | Path, *, timeout: float | None = None) -> Iterator[None]:
    """An exclusive advisory lock (``flock``): released by the kernel if the holder dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline is not None else 0))
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or deadline is None:
                    raise
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"{path} is held by another process",
                        hint="another install, update or rollback is running; retry when it ends",
                    ) from e
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock

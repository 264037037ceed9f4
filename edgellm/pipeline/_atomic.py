"""Atomic outputs the pipeline needs beyond :mod:`edgellm._fs`: whole directories, and files
written by a tool that needs a path (an exporter, a quantizer). Plain file contents go through
:func:`edgellm._fs.atomic_write`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgellm._fs import fsync_dir
from edgellm.errors import BuildError


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def check_output_path(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise BuildError(f"{out} already exists", hint="choose another --out or pass --overwrite")


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it becomes ``out``.

    On any exception the temporary directory is removed and ``out`` is left as it was
    (absent, or the previous complete version).
    """
    out = Path(out)
    check_output_path(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out`` for a tool to write; on success it becomes ``out``."""
    out = Path(out)
    check_output_path(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

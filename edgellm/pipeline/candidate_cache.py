"""The candidate cache: artifacts and their measurements, keyed by everything that made them.

A key covers the model's files, the format, the evaluation text, the thread count, and the code:
edgellm's version, a hash of the sources that export and measure candidates, and the versions of
the native libraries they call. After an upgrade nothing an older exporter wrote is reused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import shutil
from pathlib import Path

import edgellm
from edgellm.errors import BuildError
from edgellm.pipeline._atomic import atomic_dir
from edgellm.pipeline.measurement import Measurement

log = logging.getLogger(__name__)

CACHE_SCHEMA = 4
#: libraries whose version changes what an export or a measurement gives
LIBRARIES = ("llama-cpp-python", "gguf", "onnxruntime", "onnx", "onnxscript", "torch")
#: sources (relative to the edgellm package) that export and measure candidates
CODE_PACKAGES = (
    "pipeline/export",
    "pipeline/candidates.py",
    "pipeline/measurement.py",
    "pipeline/model.py",
    "pipeline/config.py",
    "pipeline/tokenizer.py",
    "runtime",
    "hardware.py",  # the bandwidth meter: efficiencies are measured against it
)


def hash_model_dir(model_dir: str | Path) -> str:
    """sha256 over the names and contents of the files a model directory is made of."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise BuildError(f"{model_dir} is empty", hint="pass an HF-format model directory")
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"edgellm_candidates": str(CACHE_SCHEMA), "edgellm": edgellm.__version__}
    for pkg in LIBRARIES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def _package_root() -> Path:
    return Path(edgellm.__file__).resolve().parent


def code_files(root: Path | None = None) -> list[Path]:
    """The source files whose code makes and measures candidates (see :data:`CODE_PACKAGES`)
    in the edgellm package at ``root`` (default: the one running)."""
    root = root or _package_root()
    files: set[Path] = set()
    for rel in CODE_PACKAGES:
        p = root / rel
        files.update(p.glob("*.py") if p.is_dir() else [p])
    return sorted(files)


def code_fingerprint(root: Path | None = None) -> str:
    """sha256 of :func:`code_files` (names and contents): another exporter, another key."""
    return _running_fingerprint() if root is None else _fingerprint(root)


@functools.lru_cache(maxsize=1)
def _running_fingerprint() -> str:  # the running code does not change under a process
    return _fingerprint(_package_root())


def _fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    for f in code_files(root):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def cache_key(model_sha256: str, fmt: str, eval_sha256: str, threads: int = 1) -> str:
    """Key of one candidate: its inputs and the code that made it (edgellm's version, the sources
    of the exporters and measurements, the native libraries' versions)."""
    blob = json.dumps(
        {
            "model": model_sha256,
            "fmt": fmt,
            "eval": eval_sha256,
            "threads": threads,
            "versions": _versions(),
            "code": code_fingerprint(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class CandidateCache:
    """Directory cache: ``<dir>/<key>/{artifact, measurement.json}``; entries appear atomically."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def get(self, key: str) -> Measurement | None:
        entry = self.dir / key
        meta = entry / "measurement.json"
        if not meta.is_file():
            return None
        try:
            m = Measurement.from_dict(json.loads(meta.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable cache entry %s: %s", entry, e)
            return None
        art = entry / Path(m.artifact).name
        if not art.is_file() or art.stat().st_size != m.size_bytes:
            return None
        m.artifact, m.cached = str(art), True
        return m

    def put(self, key: str, artifact: Path, m: Measurement) -> Measurement:
        m = dataclasses.replace(m, artifact=str(self.dir / key / artifact.name), cache_key=key)
        with atomic_dir(self.dir / key, overwrite=True) as tmp:
            shutil.copyfile(artifact, tmp / artifact.name)
            (tmp / "measurement.json").write_text(json.dumps(m.to_dict(), indent=2, sort_keys=True))
        return m

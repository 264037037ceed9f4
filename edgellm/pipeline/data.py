"""Training data: text files / JSONL (``text`` field) / the embedded corpus; split; token streams.

- ``*.jsonl``: one JSON object per line, its ``text`` field is one document.
- any other file (``.txt``, ``.md``, ...): documents separated by blank lines.
- a directory: every ``*.txt``, ``*.md`` and ``*.jsonl`` inside, in sorted order.
- ``builtin:devices`` (or ``builtin``): the embedded generated corpus (:mod:`edgellm.data`).

Special-token strings in training text (``<|user|>``...) ARE parsed as special tokens: training
data is trusted, user prompts at inference time are not.

The train/validation split is deterministic and content-based (sha256 of each document), so
it does not change when files are reordered. When the documents are too few to leave any for
validation (a file without blank lines is one document), they are cut at line boundaries into
pieces of a few KB and the pieces are split instead. ``DataSet.sha256`` goes into the lineage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import BuildError

BUILTIN_PREFIX = "builtin"
_TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".text")


@dataclasses.dataclass
class DataSet:
    train: list[str]
    val: list[str]
    sha256: str
    sources: list[dict[str, Any]]

    def lineage(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "sources": self.sources,
            "train_docs": len(self.train),
            "val_docs": len(self.val),
            "train_chars": sum(map(len, self.train)),
            "val_chars": sum(map(len, self.val)),
        }


def _read_file(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BuildError(f"{path}: cannot read data file ({e})", hint="check the path and permissions") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BuildError(f"{path}: not UTF-8 text ({e})", hint="convert the file to UTF-8") from e
    docs: list[str] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise BuildError(
                    f"{path}:{n}: invalid JSON ({e})", hint="each line must be a JSON object with a 'text' field"
                ) from e
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise BuildError(
                    f"{path}:{n}: no string 'text' field", hint="each line must be a JSON object with a 'text' field"
                )
            if rec["text"].strip():
                docs.append(rec["text"])
    else:
        docs = [p.strip("\n") + "\n" for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if not docs:
        raise BuildError(
            f"{path}: data file is empty (no text documents)",
            hint="add text (JSONL needs a 'text' field per line) or pass another --data",
        )
    return docs


def load_documents(spec: str | Path | Sequence[str | Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """Documents and their sources (path, sha256, bytes) from ``spec``."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs:
        raise BuildError("no data given", hint="pass --data FILE|DIR or --data builtin:devices")
    docs: list[str] = []
    sources: list[dict[str, Any]] = []
    for s in specs:
        s_str = str(s)
        if s_str == BUILTIN_PREFIX or s_str.startswith(BUILTIN_PREFIX + ":"):
            from edgellm.data import generate_corpus

            name = s_str.partition(":")[2] or "devices"
            if name not in ("devices",):
                raise BuildError(f"unknown builtin corpus {name!r}", hint="use builtin:devices")
            d = generate_corpus()
            docs += d
            sources.append(
                {"path": "builtin:devices", "sha256": _sha_docs(d), "bytes": sum(len(x.encode()) for x in d)}
            )
            continue
        p = Path(s)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _TEXT_SUFFIXES)
            if not files:
                raise BuildError(
                    f"{p}: no .txt/.md/.jsonl files in the data directory", hint="put text files there or pass a file"
                )
        elif p.exists():
            files = [p]
        else:
            raise BuildError(f"{p}: data file not found", hint="check --data (a file, a directory or builtin:devices)")
        for f in files:
            docs += _read_file(f)
            sources.append(
                {"path": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "bytes": f.stat().st_size}
            )
    return docs, sources


def _sha_docs(docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


#: a lone large document is cut into pieces of about this many characters (at line boundaries)
PIECE_CHARS_MAX = 4096
PIECE_CHARS_MIN = 256


def _hash_split(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    train: list[str] = []
    val: list[str] = []
    for d in docs:
        bucket = int.from_bytes(hashlib.sha256(d.encode("utf-8")).digest()[:4], "big") / 2**32
        (val if bucket < val_fraction else train).append(d)
    return train, val


def line_pieces(docs: Sequence[str]) -> list[str]:
    """``docs`` cut at line boundaries into pieces of about a twentieth of the text (between
    :data:`PIECE_CHARS_MIN` and :data:`PIECE_CHARS_MAX` characters); a longer line stays whole."""
    target = max(PIECE_CHARS_MIN, min(PIECE_CHARS_MAX, sum(map(len, docs)) // 20))
    pieces: list[str] = []
    for d in docs:
        cur: list[str] = []
        size = 0
        for line in d.splitlines(keepends=True):
            cur.append(line)
            size += len(line)
            if size >= target:
                pieces.append("".join(cur))
                cur, size = [], 0
        if cur:
            pieces.append("".join(cur))
    return pieces


def split_documents(docs: Sequence[str], val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Deterministic content-based split; guarantees at least one doc on each side if possible.

    Documents too few to leave any for validation are split as line pieces (:func:`line_pieces`).
    """
    train, val = _hash_split(docs, val_fraction)
    if not val and val_fraction > 0:
        pieces = line_pieces(docs)
        if len(pieces) > len(docs):
            train, val = _hash_split(pieces, val_fraction)
    if not val and len(train) > 1:
        val.append(train.pop())
    if not train and len(val) > 1:
        train.append(val.pop())
    if not train:
        raise BuildError("not enough data: need at least 2 documents", hint="add more text to --data")
    return train, val


def load_dataset(spec: str | Path | Sequence[str | Path], *, val_fraction: float = 0.05) -> DataSet:
    docs, sources = load_documents(spec)
    train, val = split_documents(docs, val_fraction)
    return DataSet(train=train, val=val, sha256=_sha_docs(docs), sources=sources)


def token_stream(tok: Any, docs: Sequence[str], *, bos_id: int | None, eos_id: int | None) -> np.ndarray:
    """All documents as one int64 stream: ``<s> doc </s> <s> doc </s> ...``."""
    encs = tok.encode_batch(list(docs), add_special_tokens=False)
    parts: list[int] = []
    for e in encs:
        if bos_id is not None:
            parts.append(bos_id)
        parts.extend(e.ids)
        if eos_id is not None:
            parts.append(eos_id)
    return np.asarray(parts, dtype=np.int64)


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows ``[n, seq_len + 1]`` (inputs + shifted targets) covering the stream."""
    if 2 <= len(stream) <= seq_len:  # little validation text: one shorter window
        seq_len = len(stream) - 1
    n = (len(stream) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise BuildError(
            f"validation text too short ({len(stream)} tokens < {seq_len + 1})", hint="add more data or lower --seq-len"
        )
    return np.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])

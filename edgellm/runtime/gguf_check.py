"""Checks a GGUF file must pass before llama.cpp opens it (no native code here).

llama.cpp is not a safe parser: structural damage raises, but some metadata (``block_count=0``,
an absurd ``expert_count``) aborts the whole process and corrupted tensor data loads silently.
:func:`verify_file` compares size and sha256 with a verified manifest; :func:`check_gguf`
validates the metadata and tensor table with gguf-py's pure-Python reader.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edgellm._fs import sha256_file
from edgellm.runtime.base import ModelLoadError
from edgellm.runtime.base import runtime_error as _err
from edgellm.runtime.families import FAMILIES, GGUF_ARCHS, tensor_suffixes

MAX_BLOCK_COUNT = 1024
MAX_EMBEDDING = 1 << 16
MAX_VOCAB = 1 << 20
MAX_CONTEXT = 1 << 20
_SUPPORTED_ARCHS = GGUF_ARCHS


@dataclasses.dataclass(frozen=True)
class GGUFInfo:
    """What :func:`check_gguf` learned from a GGUF's metadata (no native code involved)."""

    path: str
    size_bytes: int
    architecture: str
    block_count: int
    embedding_length: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    head_dim: int
    context_length: int
    vocab_size: int
    file_type: int | None
    tensor_types: dict[str, int]
    weights_bytes: int
    chat_template: str | None
    bos_id: int | None
    eos_id: int | None
    add_bos: bool

    def kv_cache_bytes(self, n_ctx: int, bytes_per_elem: int = 2) -> int:
        """K and V caches for ``n_ctx`` positions (F16 cache by default)."""
        return 2 * self.block_count * n_ctx * self.head_count_kv * self.head_dim * bytes_per_elem


def verify_file(path: str | Path, *, sha256: str | None = None, size: int | None = None) -> None:
    """Refuse a file whose size or sha256 differs from what a (verified) manifest says."""
    path = Path(path)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise _err(
            ModelLoadError,
            f"{path.name}: size {actual} bytes, manifest says {size}",
            "the file is truncated or replaced: reinstall the bundle",
        )
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256.lower():
            raise _err(
                ModelLoadError,
                f"{path.name}: sha256 {digest[:16]}… does not match the manifest",
                "the file is corrupted or tampered with: reinstall the bundle",
            )


def _bad(path: Path, what: str) -> ModelLoadError:
    return _err(
        ModelLoadError,
        f"{path.name} is not a loadable GGUF: {what}",
        "re-export the model with `edgellm export --format gguf-...` or reinstall the bundle",
    )


class _Fields:
    """Typed, bounded reads of a GGUF's metadata; anything odd becomes :func:`_bad`."""

    def __init__(self, reader: Any, path: Path) -> None:
        self.reader, self.path = reader, path

    def val(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise _bad(self.path, f"unreadable value for {key}") from e

    def num(self, key: str, lo: int, hi: int, default: Any = None) -> int:
        v = self.val(key, default)
        if v is None:
            raise _bad(self.path, f"missing {key}")
        if isinstance(v, (list, str)) or not lo <= int(v) <= hi:
            raise _bad(self.path, f"{key}={v!r} is outside [{lo}, {hi}]")
        return int(v)


def _hparams(f: _Fields) -> dict[str, Any]:
    """The architecture's hyper-parameters, bounded; refuses what llama.cpp would crash on."""
    path = f.path
    arch = f.val("general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise _bad(path, f"architecture {arch!r} is not supported (expected one of {_SUPPORTED_ARCHS})")
    p = arch + "."
    n_embd = f.num(p + "embedding_length", 1, MAX_EMBEDDING)
    n_head = f.num(p + "attention.head_count", 1, 4096)
    hp = {
        "architecture": arch,
        "block_count": f.num(p + "block_count", 1, MAX_BLOCK_COUNT),
        "embedding_length": n_embd,
        "feed_forward_length": f.num(p + "feed_forward_length", 1, 1 << 20),
        "head_count": n_head,
        "head_count_kv": f.num(p + "attention.head_count_kv", 1, n_head, n_head),
        "context_length": f.num(p + "context_length", 1, MAX_CONTEXT),
    }
    if n_head % hp["head_count_kv"]:
        raise _bad(path, f"head_count {n_head} is not a multiple of head_count_kv {hp['head_count_kv']}")
    if f.val(p + "expert_count", 0) not in (0, None):
        raise _bad(path, "mixture-of-experts models are not supported")
    eps = f.val(p + "attention.layer_norm_rms_epsilon")
    if eps is None or not 0.0 < float(eps) < 1.0:
        raise _bad(path, f"layer_norm_rms_eps={eps!r} is missing or invalid")
    head_dim = f.num(p + "attention.key_length", 1, 4096, n_embd // n_head if n_embd % n_head == 0 else None)
    if f.num(p + "attention.value_length", 1, 4096, head_dim) != head_dim:
        raise _bad(path, "value_length differs from key_length")
    scaling = f.val(p + "rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise _bad(path, f"rope scaling {scaling!r} is not supported")
    if scaling == "linear" and not 0.0 < float(f.val(p + "rope.scaling.factor", 0.0)) <= 1024.0:
        raise _bad(path, "rope.scaling.factor missing or out of range")
    rope_dims = f.val(p + "rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise _bad(path, f"rope.dimension_count={rope_dims} differs from the head size {head_dim}")
    hp["head_dim"] = head_dim
    return hp


def _tokenizer(f: _Fields) -> tuple[int, dict[str, int | None]]:
    """Vocabulary size and special token ids; refuses vocabularies llama.cpp asserts on."""
    path, reader = f.path, f.reader
    tok_model = f.val("tokenizer.ggml.model")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tok_model not in ("gpt2", "llama") or tokens is None:
        raise _bad(path, f"tokenizer model {tok_model!r} missing or unsupported")
    n_vocab = len(tokens.data)
    if not 1 <= n_vocab <= MAX_VOCAB:
        raise _bad(path, f"vocabulary of {n_vocab} tokens")
    try:
        token_list = tokens.contents()
    except Exception as e:  # invalid UTF-8 and the like
        raise _bad(path, "unreadable tokenizer.ggml.tokens") from e
    if len(set(token_list)) != n_vocab:  # llama.cpp asserts on duplicate tokens (SIGABRT)
        raise _bad(path, "duplicate tokens in the vocabulary")
    if tok_model == "gpt2" and "\u010a" not in token_list:  # 'Ċ' = byte-level "\n"; missing -> SIGABRT
        raise _bad(path, "the byte-level vocabulary has no newline token")
    merges = reader.get_field("tokenizer.ggml.merges")
    if tok_model == "gpt2" and (merges is None or len(merges.data) == 0):
        raise _bad(path, "a gpt2 tokenizer without merges")
    types = reader.get_field("tokenizer.ggml.token_type")
    if types is not None and len(types.data) != n_vocab:
        raise _bad(path, "token_type and tokens differ in length")
    special: dict[str, int | None] = {}
    for key in ("bos", "eos", "unknown", "padding"):
        tid = f.val(f"tokenizer.ggml.{key}_token_id")
        if tid is not None and not 0 <= int(tid) < n_vocab:
            raise _bad(path, f"{key}_token_id={tid} outside the vocabulary")
        special[key] = None if tid is None else int(tid)
    return n_vocab, special


def _expected_tensors(
    hp: dict[str, Any], n_vocab: int
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, optional) tensor name -> shape for a model of ``hp["architecture"]`` with ``hp``."""
    n_embd, n_ff, head_dim = hp["embedding_length"], hp["feed_forward_length"], hp["head_dim"]
    q_out, kv_out = hp["head_count"] * head_dim, hp["head_count_kv"] * head_dim
    shapes = {
        "attn_norm.weight": (n_embd,),
        "ffn_norm.weight": (n_embd,),
        "attn_q.weight": (n_embd, q_out),
        "attn_k.weight": (n_embd, kv_out),
        "attn_v.weight": (n_embd, kv_out),
        "attn_output.weight": (q_out, n_embd),
        "ffn_gate.weight": (n_embd, n_ff),
        "ffn_up.weight": (n_embd, n_ff),
        "ffn_down.weight": (n_ff, n_embd),
        "attn_q.bias": (q_out,),
        "attn_k.bias": (kv_out,),
        "attn_v.bias": (kv_out,),
        "attn_q_norm.weight": (head_dim,),
        "attn_k_norm.weight": (head_dim,),
    }
    family = next(f for f in FAMILIES.values() if f.gguf_arch == hp["architecture"])
    suffixes = tensor_suffixes(family).values()
    expected: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_embd, n_vocab), "output_norm.weight": (n_embd,)}
    for i in range(hp["block_count"]):
        expected.update({f"blk.{i}.{name}": shapes[name] for name in suffixes})
    return expected, {"output.weight": (n_embd, n_vocab), "rope_freqs.weight": (head_dim // 2,)}


def _tensors(f: _Fields, hp: dict[str, Any], n_vocab: int, size: int) -> tuple[dict[str, int], int]:
    """Every expected tensor, with the expected shape, inside the file: (type counts, weight bytes)."""
    expected, optional = _expected_tensors(hp, n_vocab)
    seen: set[str] = set()
    type_counts: dict[str, int] = {}
    weights = 0
    for t in f.reader.tensors:
        shape = tuple(int(x) for x in t.shape)
        want = expected.get(t.name) or optional.get(t.name)
        if want is None:
            raise _bad(f.path, f"unexpected tensor {t.name!r}")
        if shape != want:
            raise _bad(f.path, f"tensor {t.name} has shape {shape}, expected {want}")
        if t.data_offset + t.n_bytes > size:
            raise _bad(f.path, f"tensor {t.name} extends past the end of the file (truncated?)")
        seen.add(t.name)
        type_counts[t.tensor_type.name] = type_counts.get(t.tensor_type.name, 0) + 1
        weights += int(t.n_bytes)
    missing = sorted(set(expected) - seen)
    if missing:
        raise _bad(f.path, f"missing tensors {missing[:3]}{'…' if len(missing) > 3 else ''}")
    return dict(sorted(type_counts.items())), weights


def open_gguf(path: Path) -> tuple[Any, int]:
    """gguf-py's reader over ``path`` (magic checked first) and the file's size; damage is :func:`_bad`."""
    import gguf

    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise _bad(path, "bad magic (not a GGUF file)")
    try:
        return gguf.GGUFReader(str(path)), size
    except Exception as e:  # gguf-py raises ValueError/IndexError/... on damaged structure
        raise _bad(path, f"{type(e).__name__}: {e}") from e


def check_gguf(path: str | Path) -> GGUFInfo:
    """Validate a GGUF's header, metadata and tensor table without native code.

    Raises :class:`ModelLoadError` for anything llama.cpp could crash on or misread.
    """
    path = Path(path)
    if not path.is_file():
        raise _err(ModelLoadError, f"{path} does not exist", "check the model path")
    reader, size = open_gguf(path)
    f = _Fields(reader, path)
    hp = _hparams(f)
    n_vocab, special = _tokenizer(f)
    type_counts, weights = _tensors(f, hp, n_vocab, size)
    return GGUFInfo(
        path=str(path),
        size_bytes=size,
        vocab_size=n_vocab,
        file_type=f.val("general.file_type"),
        tensor_types=type_counts,
        weights_bytes=weights,
        chat_template=f.val("tokenizer.chat_template"),
        bos_id=special["bos"],
        eos_id=special["eos"],
        add_bos=bool(f.val("tokenizer.ggml.add_bos_token", False)),
        **hp,
    )

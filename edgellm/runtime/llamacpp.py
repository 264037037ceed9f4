"""llama.cpp backend (through llama-cpp-python) for GGUF artifacts.

Loading is guarded, because llama.cpp is not a safe parser: structural damage raises, but some
metadata (``block_count=0``, an absurd ``expert_count``) aborts the whole process and corrupted
tensor data loads silently. So, before llama.cpp opens a file:

1. if the caller knows them (from a verified bundle manifest), the file's size and sha256 are checked;
2. :func:`check_gguf` validates the metadata and tensor table with gguf-py's pure-Python reader;
3. optionally (``isolate=True``) a child process loads the file first, so a native crash becomes
   a :class:`ModelLoadError` instead of killing the caller.

Generation runs its own loop over the context (no ``logits_all``: the last row of logits is read
through the context), samples with the numpy sampler shared with the ONNX runtime
(:mod:`edgellm.runtime._sampling`: greedy / temperature / top-k / top-p, seeded), streams
UTF-8-safe text, honours stop sequences, and reports the model's log-probability of every generated
token (log-softmax of the raw logits, before temperature). User text is tokenized without
special-token parsing. Not thread-safe: one generation at a time (see :mod:`edgellm.runtime.base`).
"""

from __future__ import annotations

import codecs
import ctypes
import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.runtime._sampling import Sampler, StopBuffer, log_softmax  # noqa: F401 (log_softmax re-exported)
from edgellm.runtime.base import (
    GenerationError,
    GenerationParams,
    ModelLoadError,
    PromptTooLongError,
    Runtime,
    TokenEvent,
)
from edgellm.runtime.base import runtime_error as _err

log = logging.getLogger(__name__)



CTX_ALIGN = 256  # llama.cpp rounds n_ctx up to this internally; we ask for multiples of it
MAX_BLOCK_COUNT = 1024
MAX_EMBEDDING = 1 << 16
MAX_VOCAB = 1 << 20
MAX_CONTEXT = 1 << 20
_SUPPORTED_ARCHS = ("llama",)
#: tensor types llama.cpp's CPU backend repacks into an interleaved copy (x86 AVX2, Arm). Loaded
#: through mmap, their file pages stay resident next to the copy (measured here: Q4_K_M 71.8 MiB
#: peak RSS with mmap, 50.1 without), so such models are loaded without mmap.
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})


def import_llama_cpp() -> Any:
    """Import llama_cpp with its native log quiet (unless the user configured that logger)."""
    try:
        import llama_cpp
        from llama_cpp import _logger
    except ImportError as e:  # pragma: no cover - depends on the install
        raise _err(ModelLoadError, "llama-cpp-python is not installed",
                   "pip install 'edgellm[agent]' (llama-cpp-python==0.3.36)") from e
    if _logger.logger.level == logging.NOTSET:
        _logger.logger.setLevel(logging.ERROR)
    return llama_cpp


# --------------------------------------------------------------------------- checks before loading

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
        raise _err(ModelLoadError, f"{path.name}: size {actual} bytes, manifest says {size}",
                   "the file is truncated or replaced: reinstall the bundle")
    if sha256 is not None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != sha256.lower():
            raise _err(ModelLoadError, f"{path.name}: sha256 {h.hexdigest()[:16]}… does not match the manifest",
                       "the file is corrupted or tampered with: reinstall the bundle")


def _bad(path: Path, what: str) -> ModelLoadError:
    return _err(ModelLoadError, f"{path.name} is not a loadable GGUF: {what}",
                "re-export the model with `edgellm export --format gguf-...` or reinstall the bundle")


def check_gguf(path: str | Path) -> GGUFInfo:
    """Validate a GGUF's header, metadata and tensor table without native code.

    Raises :class:`ModelLoadError` for anything llama.cpp could crash on or misread.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise _err(ModelLoadError, f"{path} does not exist", "check the model path")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise _bad(path, "bad magic (not a GGUF file)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError/IndexError/... on damaged structure
        raise _bad(path, f"{type(e).__name__}: {e}") from e

    def val(key: str, default: Any = None) -> Any:
        field = reader.get_field(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise _bad(path, f"unreadable value for {key}") from e

    def num(key: str, lo: int, hi: int, default: Any = None) -> int:
        v = val(key, default)
        if v is None:
            raise _bad(path, f"missing {key}")
        if isinstance(v, (list, str)) or not lo <= int(v) <= hi:
            raise _bad(path, f"{key}={v!r} is outside [{lo}, {hi}]")
        return int(v)

    arch = val("general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise _bad(path, f"architecture {arch!r} is not supported (expected one of {_SUPPORTED_ARCHS})")
    p = arch + "."
    n_layer = num(p + "block_count", 1, MAX_BLOCK_COUNT)
    n_embd = num(p + "embedding_length", 1, MAX_EMBEDDING)
    n_ff = num(p + "feed_forward_length", 1, 1 << 20)
    n_head = num(p + "attention.head_count", 1, 4096)
    n_head_kv = num(p + "attention.head_count_kv", 1, n_head, n_head)
    if n_head % n_head_kv:
        raise _bad(path, f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    n_ctx_train = num(p + "context_length", 1, MAX_CONTEXT)
    if val(p + "expert_count", 0) not in (0, None):
        raise _bad(path, "mixture-of-experts models are not supported")
    eps = val(p + "attention.layer_norm_rms_epsilon")
    if eps is None or not 0.0 < float(eps) < 1.0:
        raise _bad(path, f"layer_norm_rms_eps={eps!r} is missing or invalid")
    head_dim = num(p + "attention.key_length", 1, 4096, n_embd // n_head if n_embd % n_head == 0 else None)
    if num(p + "attention.value_length", 1, 4096, head_dim) != head_dim:
        raise _bad(path, "value_length differs from key_length")
    scaling = val(p + "rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise _bad(path, f"rope scaling {scaling!r} is not supported")
    if scaling == "linear" and not 0.0 < float(val(p + "rope.scaling.factor", 0.0)) <= 1024.0:
        raise _bad(path, "rope.scaling.factor missing or out of range")
    rope_dims = val(p + "rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise _bad(path, f"rope.dimension_count={rope_dims} differs from the head size {head_dim}")

    tok_model = val("tokenizer.ggml.model")
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
        tid = val(f"tokenizer.ggml.{key}_token_id")
        if tid is not None and not 0 <= int(tid) < n_vocab:
            raise _bad(path, f"{key}_token_id={tid} outside the vocabulary")
        special[key] = None if tid is None else int(tid)

    # tensor table: every expected tensor, with the expected shape, inside the file
    q_out, kv_out = n_head * head_dim, n_head_kv * head_dim
    expected: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_embd, n_vocab), "output_norm.weight": (n_embd,)}
    for i in range(n_layer):
        b = f"blk.{i}."
        expected.update({
            b + "attn_norm.weight": (n_embd,), b + "ffn_norm.weight": (n_embd,),
            b + "attn_q.weight": (n_embd, q_out), b + "attn_k.weight": (n_embd, kv_out),
            b + "attn_v.weight": (n_embd, kv_out), b + "attn_output.weight": (q_out, n_embd),
            b + "ffn_gate.weight": (n_embd, n_ff), b + "ffn_up.weight": (n_embd, n_ff),
            b + "ffn_down.weight": (n_ff, n_embd),
        })
    optional = {"output.weight": (n_embd, n_vocab), "rope_freqs.weight": (head_dim // 2,)}
    seen: dict[str, tuple[int, ...]] = {}
    type_counts: dict[str, int] = {}
    weights = 0
    for t in reader.tensors:
        shape = tuple(int(x) for x in t.shape)
        want = expected.get(t.name) or optional.get(t.name)
        if want is None:
            raise _bad(path, f"unexpected tensor {t.name!r}")
        if shape != want:
            raise _bad(path, f"tensor {t.name} has shape {shape}, expected {want}")
        if t.data_offset + t.n_bytes > size:
            raise _bad(path, f"tensor {t.name} extends past the end of the file (truncated?)")
        seen[t.name] = shape
        type_counts[t.tensor_type.name] = type_counts.get(t.tensor_type.name, 0) + 1
        weights += int(t.n_bytes)
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise _bad(path, f"missing tensors {missing[:3]}{'…' if len(missing) > 3 else ''}")
    add_bos = val("tokenizer.ggml.add_bos_token", False)
    return GGUFInfo(
        path=str(path), size_bytes=size, architecture=arch, block_count=n_layer, embedding_length=n_embd,
        feed_forward_length=n_ff, head_count=n_head, head_count_kv=n_head_kv, head_dim=head_dim,
        context_length=n_ctx_train, vocab_size=n_vocab, file_type=val("general.file_type"),
        tensor_types=dict(sorted(type_counts.items())), weights_bytes=weights,
        chat_template=val("tokenizer.chat_template"), bos_id=special["bos"], eos_id=special["eos"],
        add_bos=bool(add_bos),
    )


def probe_in_subprocess(path: str | Path, *, timeout: float = 120.0) -> None:
    """Load ``path`` with llama.cpp in a child process; a native crash there becomes an error here."""
    code = "import sys; from edgellm.runtime.llamacpp import _probe_main; _probe_main(sys.argv[1])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired as e:
        raise _err(ModelLoadError, f"loading {Path(path).name} took over {timeout:.0f} s in the probe process",
                   "the file may be hostile or far too large for this device") from e
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        raise _err(ModelLoadError, f"llama.cpp failed to load {Path(path).name} in a probe process ({how}): "
                             f"{' | '.join(tail)}", "the GGUF is malformed: re-export or reinstall it")


def _probe_main(path: str) -> None:  # pragma: no cover - runs in the child
    llama_cpp = import_llama_cpp()
    llm = llama_cpp.Llama(model_path=path, n_ctx=CTX_ALIGN, n_threads=1, n_threads_batch=1, verbose=False)
    llm.close()


# --------------------------------------------------------------------------- the runtime

def _round_ctx(n: int) -> int:
    return max(CTX_ALIGN, -(-int(n) // CTX_ALIGN) * CTX_ALIGN)


class LlamaCppRuntime(Runtime):
    """A GGUF model loaded in llama.cpp. Create with :meth:`load`."""

    kind = "gguf"

    def __init__(self, llm: Any, info: GGUFInfo, context_length: int, threads: int) -> None:
        self._llm = llm
        self.info = info
        self._context_length = context_length
        self.threads = threads
        self._llama_cpp = import_llama_cpp()
        self._vocab = self._llama_cpp.llama_model_get_vocab(llm.model)
        self._n_vocab = llm.n_vocab()
        self._cached: list[int] = []  # tokens whose K/V are in the cache, in order
        self.use_mmap = True
        self._closed = False

    # ---- construction
    @classmethod
    def load(cls, path: str | Path, threads: int = 1, context_length: int | None = None, *,
             sha256: str | None = None, size: int | None = None, isolate: bool = False,
             kv_cache_type: str = "f16", batch_size: int = 256, mmap: bool | None = None) -> "LlamaCppRuntime":
        """Verify, validate, then load ``path``.

        ``context_length`` defaults to the model's trained context (llama.cpp gets it rounded up to
        a multiple of 256). ``sha256``/``size`` (from a verified manifest) are checked before any
        parser reads the file. ``kv_cache_type="f32"`` gives exact parity with torch. ``mmap``
        defaults to on, except for models with repacked types (:data:`REPACKED_TYPES`).
        """
        path = Path(path)
        if not path.is_file():
            raise _err(ModelLoadError, f"{path} does not exist", "check the artifact path in the bundle")
        if sha256 is not None or size is not None:
            verify_file(path, sha256=sha256, size=size)
        info = check_gguf(path)
        if threads < 1:
            raise _err(ModelLoadError, f"threads={threads}", "use at least 1 thread")
        ctx = info.context_length if context_length is None else int(context_length)
        if ctx < 1:
            raise _err(ModelLoadError, f"context_length={ctx}", "use a positive context length")
        if ctx > info.context_length:
            log.warning("context %d exceeds the model's trained %d; using %d", ctx, info.context_length,
                        info.context_length)
            ctx = info.context_length
        if isolate:
            probe_in_subprocess(path)
        kv = {"f16": 1, "f32": 0}.get(kv_cache_type)
        if kv is None:
            raise _err(ModelLoadError, f"kv_cache_type {kv_cache_type!r}", "use 'f16' or 'f32'")
        llama_cpp = import_llama_cpp()
        n_ctx = _round_ctx(ctx)
        use_mmap = mmap if mmap is not None else not (set(info.tensor_types) & REPACKED_TYPES)
        try:
            llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=min(batch_size, n_ctx), n_ubatch=min(batch_size, n_ctx),
                n_threads=threads, n_threads_batch=threads, type_k=kv, type_v=kv, use_mmap=use_mmap,
                verbose=False,
            )
        except Exception as e:  # llama-cpp-python raises ValueError on load failures
            raise _err(ModelLoadError, f"llama.cpp could not load {path.name}: {e}",
                       "re-export the model or check the file is complete") from e
        log.info("loaded %s (%s, ctx %d, %d threads, mmap %s)", path.name, info.tensor_types, ctx, threads, use_mmap)
        rt = cls(llm, info, ctx, threads)
        rt.use_mmap = use_mmap
        return rt

    # ---- properties
    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    def memory_bytes(self) -> dict[str, int]:
        """Weights + KV cache (F16) for this context: what the model needs resident."""
        kv = self.info.kv_cache_bytes(_round_ctx(self._context_length))
        return {"weights_bytes": self.info.weights_bytes, "kv_cache_bytes": kv,
                "peak_bytes": self.info.weights_bytes + kv}

    # ---- tokenizer
    def _check_open(self) -> None:
        if self._closed:
            raise _err(GenerationError, "runtime is closed", "load the model again")

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        self._check_open()
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def _piece(self, token: int) -> bytes:
        buf = self._piece_buf = getattr(self, "_piece_buf", None) or (ctypes.c_char * 256)()
        n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # a piece longer than the buffer: llama.cpp returns -(needed size)
            big = (ctypes.c_char * -n)()
            n = self._llama_cpp.llama_token_to_piece(self._vocab, token, big, len(big), 0, False)
            return bytes(big[:max(n, 0)])
        return bytes(buf[:n])

    def detokenize(self, ids: Sequence[int]) -> str:
        self._check_open()
        return b"".join(self._piece(int(t)) for t in ids).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # ---- evaluation
    def _eval(self, tokens: Sequence[int], *, all_logits: bool = False) -> np.ndarray | None:
        """Append ``tokens`` to the cache; return logits of every position if ``all_logits``."""
        llm = self._llm
        n_past = len(self._cached)
        llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
        rows = []
        step = llm.n_batch
        for i in range(0, len(tokens), step):
            chunk = list(tokens[i:i + step])
            llm._batch.set_batch(batch=chunk, n_past=n_past, logits_all=all_logits)
            try:
                llm._ctx.decode(llm._batch)
            except RuntimeError as e:
                self._cached = self._cached[:n_past]
                raise _err(GenerationError, f"llama.cpp decode failed: {e}", "shorten the prompt") from e
            self._cached.extend(chunk)
            n_past += len(chunk)
            if all_logits:
                ptr = llm._ctx.get_logits()
                rows.append(np.ctypeslib.as_array(ptr, shape=(len(chunk), self._n_vocab)).copy())
        return np.concatenate(rows) if all_logits else None

    def _last_logits(self) -> np.ndarray:
        ptr = self._llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    def _prefill(self, ids: Sequence[int]) -> None:
        """Reuse the cached prefix shared with ``ids``; evaluate the rest (at least one token)."""
        k = 0
        for a, b in zip(self._cached, ids):
            if a != b:
                break
            k += 1
        k = min(k, len(ids) - 1)
        self._cached = self._cached[:k]
        self._eval(ids[k:])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits for every position of ``ids`` (a fresh evaluation), shape (len(ids), vocab)."""
        self._check_open()
        ids = [int(t) for t in ids]
        if not ids or len(ids) > self._context_length:
            raise _err(PromptTooLongError, f"{len(ids)} tokens for a context of {self._context_length}",
                       "score at most context_length tokens at a time")
        self._cached = []
        out = self._eval(ids, all_logits=True)
        assert out is not None
        return out

    def last_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits after ``ids`` (reusing the cached prefix)."""
        self._check_open()
        ids = [int(t) for t in ids]
        if not ids or len(ids) > self._context_length:
            raise _err(PromptTooLongError, f"{len(ids)} tokens for a context of {self._context_length}",
                       "shorten the input")
        self._prefill(ids)
        return self._last_logits()

    def decode_speed(self, n_tokens: int = 64, prompt: Sequence[int] | None = None) -> float:
        """Greedy decode tokens/s after a short prompt, ignoring end-of-generation (a benchmark)."""
        import time

        self._check_open()
        ids = list(prompt) if prompt else [self.info.bos_id or 0]
        n_tokens = max(1, min(n_tokens, self._context_length - len(ids)))
        self._cached = []
        self._prefill(ids)
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            tok = int(np.argmax(self._last_logits()))
            self._eval([tok])
        return n_tokens / (time.perf_counter() - t0)

    # ---- generation
    def generate(self, prompt: str | Sequence[int], params: GenerationParams) -> Iterator[TokenEvent]:
        self._check_open()
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise _err(GenerationError, "empty prompt", "send at least one token of prompt")
        if any(not 0 <= t < self._n_vocab for t in ids):
            raise _err(GenerationError, "prompt token id outside the vocabulary", "tokenize with this model")
        self.check_fits(len(ids), params)
        return self._generate(ids, params)

    def _generate(self, ids: list[int], params: GenerationParams) -> Iterator[TokenEvent]:
        sampler = Sampler(params)  # shared with the ONNX runtime: same seed, same choices
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopBuffer(params.stop)
        self._prefill(ids)
        for i in range(params.max_tokens):
            tok, logprob = sampler.sample(self._last_logits())
            lp = logprob if params.logprobs else None
            if self.is_eog(tok):
                yield TokenEvent(tok, stops.flush(), lp, "stop")
                return
            text, hit = stops.push(decoder.decode(self._piece(tok)))
            if hit:
                yield TokenEvent(tok, text, lp, "stop")
                return
            if i == params.max_tokens - 1:
                yield TokenEvent(tok, text + stops.push(decoder.decode(b"", final=True))[0] + stops.flush(),
                                 lp, "length")
                return
            yield TokenEvent(tok, text, lp)
            self._eval([tok])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._llm.close()

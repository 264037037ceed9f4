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
token (log-softmax of the raw logits, before temperature and grammar). User text is tokenized without
special-token parsing. A grammar (:mod:`edgellm.runtime.grammar`) constrains sampling through
llama.cpp's grammar sampler. Chat prompts use the template the GGUF carries
(``tokenizer.chat_template``), and text is normalized (NFC) first when the GGUF records the
tokenizer's normalizer (``edgellm.tokenizer.normalizer``), and gets its sentencepiece dummy prefix
here when that goes at the start of a text only (``edgellm.tokenizer.space_prefix``). Not thread-safe: one generation at a time (see :mod:`edgellm.runtime.base`).
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import subprocess
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.formats import GGUF
from edgellm.runtime._sampling import log_softmax  # noqa: F401 (re-exported)
from edgellm.runtime.base import Constraint, GenerationError, ModelLoadError, Runtime, TextDecoder, shared_prefix
from edgellm.runtime.base import runtime_error as _err
from edgellm.runtime.gguf_check import GGUFInfo, check_gguf, verify_file

log = logging.getLogger(__name__)

CTX_ALIGN = 256  # llama.cpp rounds n_ctx up to this internally; we ask for multiples of it
#: tensor types llama.cpp's CPU backend repacks into an interleaved copy (x86 AVX2, Arm). Loaded
#: through mmap, their file pages stay resident next to the copy (measured here: Q4_K_M 71.8 MiB
#: peak RSS with mmap, 50.1 without), so such models are loaded without mmap.
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})
#: KV-cache types accepted by :meth:`LlamaCppRuntime.load` -> ggml type ids
KV_TYPES = {"f16": 1, "f32": 0, "q8_0": 8}


def import_llama_cpp() -> Any:
    """Import llama_cpp with its native log quiet (unless the user configured that logger)."""
    try:
        import llama_cpp
        from llama_cpp import _logger
    except ImportError as e:  # pragma: no cover - depends on the install
        raise _err(
            ModelLoadError,
            "llama-cpp-python is not installed",
            "pip install 'edgellm[agent]' (llama-cpp-python==0.3.36)",
        ) from e
    if _logger.logger.level == logging.NOTSET:
        _logger.logger.setLevel(logging.ERROR)
    return llama_cpp


# --------------------------------------------------------------------------- checks before loading


def probe_in_subprocess(path: str | Path, *, timeout: float = 120.0) -> None:
    """Load ``path`` with llama.cpp in a child process; a native crash there becomes an error here."""
    code = "import sys; from edgellm.runtime.llamacpp import _probe_main; _probe_main(sys.argv[1])"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    except subprocess.TimeoutExpired as e:
        raise _err(
            ModelLoadError,
            f"loading {Path(path).name} took over {timeout:.0f} s in the probe process",
            "the file may be hostile or far too large for this device",
        ) from e
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        raise _err(
            ModelLoadError,
            f"llama.cpp failed to load {Path(path).name} in a probe process ({how}): {' | '.join(tail)}",
            "the GGUF is malformed: re-export or reinstall it",
        )


def _probe_main(path: str) -> None:  # pragma: no cover - runs in the child
    llama_cpp = import_llama_cpp()
    llm = llama_cpp.Llama(model_path=path, n_ctx=CTX_ALIGN, n_threads=1, n_threads_batch=1, verbose=False)
    llm.close()


# --------------------------------------------------------------------------- the runtime


def _round_ctx(n: int) -> int:
    return max(CTX_ALIGN, -(-int(n) // CTX_ALIGN) * CTX_ALIGN)


class LlamaCppRuntime(Runtime):
    """A GGUF model loaded in llama.cpp. Create with :meth:`load`."""

    kind = GGUF
    supports_grammar = True

    def __init__(self, llm: Any, info: GGUFInfo, context_length: int, threads: int) -> None:
        self._llm = llm
        self.info = info
        self._context_length = context_length
        self.threads = threads
        self._llama_cpp = import_llama_cpp()
        self._vocab = self._llama_cpp.llama_model_get_vocab(llm.model)
        self._n_vocab = llm.n_vocab()
        self._cached: list[int] = []  # tokens whose K/V are in the cache, in order
        # positions llama.cpp may hold K/V for: at least len(_cached), more after _cached is cut
        self._kv_len = 1 << 30  # unknown at load: the first evaluation clears
        self.bos_id = info.bos_id
        self.use_mmap = True
        self.settings: dict[str, Any] = {"threads": threads}  # what llama.cpp was given (set by load)
        self._closed = False
        meta = getattr(llm, "metadata", None) or {}
        self._normalizer = meta.get("edgellm.tokenizer.normalizer")
        if self._normalizer not in (None, "NFC"):
            raise _err(
                ModelLoadError,
                f"unknown tokenizer normalizer {self._normalizer!r}",
                "re-export the model with this version of edgellm",
            )
        self._space_first = meta.get("edgellm.tokenizer.space_prefix") == "first"
        controls = self._control_texts()
        self._controls = tuple(controls)
        self._set_chat_template(meta.get("tokenizer.chat_template"), self._special_token_texts(meta), controls)

    def _special_token_texts(self, meta: dict[str, str]) -> dict[str, str]:
        """The bos/eos/unk/pad token texts the GGUF declares: the variables a chat template may use."""
        out = {}
        for name in ("bos", "eos", "unk", "pad"):
            value = meta.get(f"tokenizer.ggml.{name}_token_id")
            if value is not None and value.isdigit() and int(value) < self._n_vocab:
                out[f"{name}_token"] = self._token_text(int(value))
        return out

    def _token_text(self, token: int) -> str:
        raw = self._llama_cpp.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def _control_texts(self) -> list[str]:
        """Texts that tokenize to a control or user-defined token when special tokens are parsed."""
        lib = self._llama_cpp
        mask = lib.LLAMA_TOKEN_ATTR_CONTROL | lib.LLAMA_TOKEN_ATTR_USER_DEFINED
        return [self._token_text(t) for t in range(self._n_vocab) if lib.llama_vocab_get_attr(self._vocab, t) & mask]

    # ---- construction
    @classmethod
    def load(
        cls,
        path: str | Path,
        threads: int = 1,
        context_length: int | None = None,
        *,
        sha256: str | None = None,
        size: int | None = None,
        isolate: bool = False,
        kv_cache_type: str = "f16",
        batch_size: int = 256,
        mmap: bool | None = None,
        flash_attn: bool = False,
        ubatch_size: int | None = None,
    ) -> LlamaCppRuntime:
        """Verify, validate, then load ``path``.

        ``context_length`` defaults to the model's trained context (llama.cpp gets it rounded up to
        a multiple of 256). ``sha256``/``size`` (from a verified manifest) are checked before any
        parser reads the file. ``kv_cache_type="f32"`` gives exact parity with torch;
        ``"q8_0"`` halves the cache and needs ``flash_attn``. ``mmap`` defaults to on, except for
        models with repacked types (:data:`REPACKED_TYPES`). ``ubatch_size`` defaults to
        ``batch_size``. What llama.cpp was given is in :attr:`settings`.
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
            log.warning(
                "context %d exceeds the model's trained %d; using %d", ctx, info.context_length, info.context_length
            )
            ctx = info.context_length
        if isolate:
            probe_in_subprocess(path)
        kv = KV_TYPES.get(kv_cache_type)
        if kv is None:
            raise _err(ModelLoadError, f"kv_cache_type {kv_cache_type!r}", f"use one of {', '.join(KV_TYPES)}")
        if kv_cache_type == "q8_0" and not flash_attn:
            raise _err(ModelLoadError, "a q8_0 KV cache needs flash attention in llama.cpp", "pass flash_attn=True")
        llama_cpp = import_llama_cpp()
        n_ctx = _round_ctx(ctx)
        use_mmap = mmap if mmap is not None else not (set(info.tensor_types) & REPACKED_TYPES)
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=min(batch_size, n_ctx),
                n_ubatch=min(ubatch_size or batch_size, batch_size, n_ctx),
                n_threads=threads,
                n_threads_batch=threads,
                type_k=kv,
                type_v=kv,
                use_mmap=use_mmap,
                flash_attn=flash_attn,
                verbose=False,
            )
        except Exception as e:  # llama-cpp-python raises ValueError on load failures
            raise _err(
                ModelLoadError,
                f"llama.cpp could not load {path.name}: {e}",
                "re-export the model or check the file is complete",
            ) from e
        cp = llm.context_params
        settings = {
            "threads": int(cp.n_threads),
            "threads_batch": int(cp.n_threads_batch),
            "flash_attn": cp.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "kv_cache_type": kv_cache_type,
            "batch_size": int(cp.n_batch),
            "ubatch_size": int(cp.n_ubatch),
            "mmap": llm.model_params.load_mode == llama_cpp.LLAMA_LOAD_MODE_MMAP,
        }
        log.info("loaded %s (%s, ctx %d, %s)", path.name, info.tensor_types, ctx, settings)
        rt = cls(llm, info, ctx, threads)
        rt.use_mmap = use_mmap
        rt.settings = settings
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
        return {
            "weights_bytes": self.info.weights_bytes,
            "kv_cache_bytes": kv,
            "peak_bytes": self.info.weights_bytes + kv,
        }

    # ---- tokenizer
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        self._check_open()
        if self._normalizer == "NFC":
            text = unicodedata.normalize("NFC", text)
        if (
            self._space_first
            and text
            and not text.startswith(" ")
            and not (special and any(c and text.startswith(c) for c in self._controls))
        ):
            text = " " + text  # the dummy prefix, at the start of the text only
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def _piece(self, token: int) -> bytes:
        buf = self._piece_buf = getattr(self, "_piece_buf", None) or (ctypes.c_char * 256)()
        n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # a piece longer than the buffer: llama.cpp returns -(needed size)
            big = (ctypes.c_char * -n)()
            n = self._llama_cpp.llama_token_to_piece(self._vocab, token, big, len(big), 0, False)
            return big.raw[: max(n, 0)]
        return buf.raw[: max(n, 0)]

    def token_bytes(self, token: int) -> bytes:
        return self._piece(int(token))

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
        if self._kv_len > n_past:  # drop K/V past the reused prefix (scans every cell: not per token)
            llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
            self._kv_len = n_past
        rows = []
        step = llm.n_batch
        for i in range(0, len(tokens), step):
            chunk = list(tokens[i : i + step])
            llm._batch.set_batch(batch=chunk, n_past=n_past, logits_all=all_logits)
            try:
                llm._ctx.decode(llm._batch)
            except RuntimeError as e:
                self._cached = self._cached[:n_past]
                self._kv_len = 1 << 30  # a failed batch may have written some cells
                raise _err(GenerationError, f"llama.cpp decode failed: {e}", "shorten the prompt") from e
            self._cached.extend(chunk)
            n_past += len(chunk)
            self._kv_len = n_past
            if all_logits:
                ptr = llm._ctx.get_logits()
                rows.append(np.ctypeslib.as_array(ptr, shape=(len(chunk), self._n_vocab)).copy())
        return np.concatenate(rows) if all_logits else None

    def _last_logits(self) -> np.ndarray:
        ptr = self._llama_cpp.llama_get_logits_ith(self._llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    def _all_logits(self, ids: list[int]) -> np.ndarray:
        self._cached = []
        out = self._eval(ids, all_logits=True)
        assert out is not None
        return out

    # ---- hooks of the shared generation loop
    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Reuse the cached prefix shared with ``ids``; evaluate the rest (at least one token)."""
        self._cached = self._cached[: shared_prefix(self._cached, ids)]
        self._eval(ids[len(self._cached) :])
        return self._last_logits()

    def _step(self, token: int) -> np.ndarray:
        self._eval([token])
        return self._last_logits()

    def _is_end(self, token: int) -> bool:
        return self.is_eog(token)

    def _text_decoder(self) -> TextDecoder:
        return _PieceDecoder(self._piece)

    def _constraint(self, grammar: str) -> Constraint:
        from edgellm.runtime.grammar import LlamaGrammar

        try:
            return LlamaGrammar(self._llama_cpp, self._vocab, self._n_vocab, grammar)
        except ValueError as e:
            raise _err(GenerationError, str(e), "fix the grammar or JSON schema") from e

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._llm.close()


class _PieceDecoder(TextDecoder):
    """Decodes each token's bytes incrementally (a character split across tokens waits)."""

    def __init__(self, piece: Any) -> None:
        self._piece = piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._piece(token))

    def finish(self) -> str:
        return self._utf8.decode(b"", final=True)

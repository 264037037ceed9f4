"""onnxruntime backend for ONNX artifacts made by ``edgellm export --format onnx|onnx-int8``.

The graph (see :mod:`edgellm.pipeline.export.onnx`) takes ``input_ids`` plus a per-layer KV cache
(``past.{i}.key/value``) and returns ``logits`` plus ``present.{i}.key/value``: one prompt
pass with an empty cache, then one token per step. No torch import anywhere here.

Tokenizer lookup: ``model_dir/tokenizer.json``, else the copy embedded in the ONNX metadata
(``edgellm.tokenizer``), else ``tokenizer.json`` next to the file. User text is tokenized
without special-token parsing (``"</s>"`` typed by a user is text, not end-of-sequence); use
:meth:`OnnxRuntime.chat_token_ids` to build chat prompts whose role markers ARE special tokens.
Not thread-safe: one generation at a time (see :mod:`edgellm.runtime.base`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.formats import ONNX
from edgellm.runtime.base import GenerationError, ModelLoadError, Runtime, TextDecoder, shared_prefix
from edgellm.runtime.base import runtime_error as _err

log = logging.getLogger(__name__)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _load_tokenizer(path: Path, md: Path | None, meta: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    """The tokenizer and its config: ``md/tokenizer.json``, else the copy in the ONNX metadata,
    else ``tokenizer.json`` next to the file."""
    from tokenizers import Tokenizer

    tok_cfg: dict[str, Any] = {}
    tokenizer = None
    try:
        if md is not None and (md / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(md / "tokenizer.json"))
            tok_cfg = _read_json(md / "tokenizer_config.json")
        elif meta.get("edgellm.tokenizer"):
            tokenizer = Tokenizer.from_str(meta["edgellm.tokenizer"])
            tok_cfg = json.loads(meta.get("edgellm.tokenizer_config") or "{}")
        elif (path.parent / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(path.parent / "tokenizer.json"))
            tok_cfg = _read_json(path.parent / "tokenizer_config.json")
    except Exception as e:  # tokenizers raises a bare Exception
        raise _err(
            ModelLoadError,
            f"unreadable tokenizer for {path.name}: {e}",
            "copy tokenizer.json from the model directory again",
        ) from e
    if tokenizer is None:
        raise _err(
            ModelLoadError,
            f"no tokenizer.json for {path.name}",
            "pass model_dir= (the directory with tokenizer.json) or put it next to the file",
        )
    return tokenizer, tok_cfg


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character standing for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_DECODER = _byte_decoder()


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string or ``{"content": ...}``."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


class OnnxRuntime(Runtime):
    """An ONNX causal LM in onnxruntime. Create with :meth:`load`."""

    kind = ONNX

    def __init__(
        self,
        session: Any,
        tokenizer: Any,
        *,
        path: Path,
        n_layers: int,
        n_kv: int,
        head_dim: int,
        vocab_size: int,
        context_length: int,
        bos_id: int | None,
        eos_ids: list[int],
        add_bos: bool = True,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self._session = session
        self._tok = tokenizer
        self.path = path
        self.n_layers, self.n_kv, self.head_dim = n_layers, n_kv, head_dim
        self.vocab_size = vocab_size
        self._context_length = context_length
        self.bos_id, self.eos_ids, self.add_bos = bos_id, eos_ids, add_bos
        added_tokens = tokenizer.get_added_tokens_decoder()
        self._added_ids = frozenset(added_tokens)
        added = [t.content for t in added_tokens.values()]
        self._set_chat_template(chat_template, special_tokens or {}, added)
        self._out_names = [o.name for o in session.get_outputs()]
        self.settings: dict[str, Any] = {}  # what onnxruntime was given (set by load)
        self._closed = False
        # KV cache kept between generations: a prompt sharing a prefix with the previous
        # prompt + output (chat turns, a fixed system prompt) only evaluates the new tokens.
        self._cached_ids: list[int] = []
        self._cached_past: dict[str, np.ndarray] | None = None

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        model_dir: str | Path | None = None,
        threads: int = 1,
        context_length: int | None = None,
    ) -> OnnxRuntime:
        """Load ``path`` with ``threads`` intra-op threads (no spin-waiting)."""
        try:
            import onnxruntime as ort
            import tokenizers  # noqa: F401 (fail early with the install hint)
        except ImportError as e:  # pragma: no cover - depends on the install
            raise _err(
                ModelLoadError, f"onnxruntime/tokenizers not installed ({e})", "pip install 'edgellm[agent]'"
            ) from e
        path = Path(path)
        if not path.is_file():
            raise _err(ModelLoadError, f"{path} does not exist", "check the artifact path")
        if threads < 1:
            raise _err(ModelLoadError, f"threads={threads}", "use at least 1 thread")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise _err(
                ModelLoadError,
                f"onnxruntime could not load {path.name}: {str(e).splitlines()[0][:300]}",
                "the file is corrupted or not an edgellm ONNX export: re-export or reinstall it",
            ) from e
        meta = dict(session.get_modelmeta().custom_metadata_map)
        inputs = {i.name: i for i in session.get_inputs()}
        if "input_ids" not in inputs or "past.0.key" not in inputs:
            raise _err(
                ModelLoadError,
                f"{path.name} has no input_ids/past.N.key inputs",
                "export it with `edgellm export --format onnx` (KV-cache graph)",
            )
        n_layers = sum(1 for n in inputs if n.startswith("past.") and n.endswith(".key"))
        shape = inputs["past.0.key"].shape
        n_kv = int(meta.get("edgellm.num_kv_heads") or shape[1])
        head_dim = int(meta.get("edgellm.head_dim") or shape[3])
        logits_shape = session.get_outputs()[0].shape
        vocab = int(meta.get("edgellm.vocab_size") or logits_shape[-1])

        md = Path(model_dir) if model_dir is not None else None
        tokenizer, tok_cfg = _load_tokenizer(path, md, meta)
        cfg: dict[str, Any] = {}
        if meta.get("edgellm.config"):
            cfg = json.loads(meta["edgellm.config"])
        elif md is not None:
            cfg = {**_read_json(md / "config.json"), **_read_json(md / "generation_config.json")}
        bos = cfg.get("bos_token_id")
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
        for name in (tok_cfg.get("eos_token"),):
            if isinstance(name, str) and tokenizer.token_to_id(name) is not None:
                tid = tokenizer.token_to_id(name)
                if tid not in eos_ids:
                    eos_ids.append(tid)
        model_ctx = int(meta.get("edgellm.context_length") or cfg.get("max_position_embeddings") or 2048)
        ctx = model_ctx if context_length is None else int(context_length)
        if ctx < 2:
            raise _err(ModelLoadError, f"context_length={ctx}", "use a context of at least 2 tokens")
        if ctx > model_ctx:
            log.warning("context %d exceeds the model's %d; using %d", ctx, model_ctx, model_ctx)
            ctx = model_ctx
        add_bos = bool(tok_cfg.get("add_bos_token", True)) and bos is not None
        log.info("loaded %s (%d layers, ctx %d, %d threads)", path.name, n_layers, ctx, threads)
        template = meta.get("edgellm.chat_template") or tok_cfg.get("chat_template")
        specials = {
            name: text
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if isinstance(text := _token_text(tok_cfg.get(name)), str)
        }
        rt = cls(
            session,
            tokenizer,
            path=path,
            n_layers=n_layers,
            n_kv=n_kv,
            head_dim=head_dim,
            vocab_size=vocab,
            context_length=ctx,
            bos_id=bos,
            eos_ids=eos_ids,
            add_bos=add_bos,
            chat_template=template if isinstance(template, str) else None,
            special_tokens=specials,
        )
        rt.settings = {"threads": int(so.intra_op_num_threads)}  # what onnxruntime was given
        return rt

    # ---- properties ----------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def n_vocab(self) -> int:
        return self.vocab_size

    @property
    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` this model uses."""
        return self._tok

    def memory_bytes(self) -> dict[str, int]:
        """File size (weights) + fp32 KV cache for the context: what the model needs resident."""
        w = self.path.stat().st_size
        kv = 2 * self.n_layers * self._context_length * self.n_kv * self.head_dim * 4
        return {"weights_bytes": w, "kv_cache_bytes": kv, "peak_bytes": w + kv}

    # ---- tokenizer -------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        self._check_open()
        tok = self._tok
        prev = tok.encode_special_tokens
        tok.encode_special_tokens = not special
        try:
            ids = tok.encode(text, add_special_tokens=False).ids
        finally:
            tok.encode_special_tokens = prev
        if add_bos and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes: byte-level pieces through GPT-2's byte alphabet, sentencepiece byte
        pieces ``<0xNN>`` as that byte, ``▁`` as a space; added tokens as their text."""
        piece = self._tok.id_to_token(int(token))
        if piece is None:
            return b""
        if int(token) in self._added_ids:
            return piece.encode("utf-8")
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        if all(c in _BYTE_DECODER for c in piece) and type(self._tok.decoder).__name__ == "ByteLevel":
            return bytes(_BYTE_DECODER[c] for c in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    def detokenize(self, ids: Sequence[int]) -> str:
        self._check_open()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    # ---- evaluation ------------------------------------------------------------------------
    def _empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        z = np.zeros((batch, self.n_kv, 0, self.head_dim), dtype=np.float32)
        feed = {}
        for i in range(self.n_layers):
            feed[f"past.{i}.key"] = z
            feed[f"past.{i}.value"] = z
        return feed

    def _run(self, ids: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        outs = self._session.run(self._out_names, {"input_ids": ids, **past})
        present = {}
        for i in range(self.n_layers):
            present[f"past.{i}.key"] = outs[1 + 2 * i]
            present[f"past.{i}.value"] = outs[2 + 2 * i]
        return outs[0], present

    def _all_logits(self, ids: list[int]) -> np.ndarray:
        out, _ = self._run(np.asarray([ids], dtype=np.int64), self._empty_past())
        return out[0]

    def batch_logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``[B, S, V]`` for equal-length rows ``batch`` ``[B, S]`` (one batched pass)."""
        self._check_open()
        batch = np.asarray(batch, dtype=np.int64)
        out, _ = self._run(batch, self._empty_past(batch.shape[0]))
        return out

    # ---- hooks of the shared generation loop -----------------------------------------------
    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Run ``ids`` reusing the cached prefix (at least the last token is evaluated)."""
        k = shared_prefix(self._cached_ids, ids)
        if k > 0 and self._cached_past is not None:
            past = {n: a[:, :, :k, :] for n, a in self._cached_past.items()}
        else:
            k, past = 0, self._empty_past()
        self._cached_ids, self._cached_past = [], None  # invalid until the run succeeds
        logits, past = self._run(np.asarray([ids[k:]], dtype=np.int64), past)
        self._cached_ids, self._cached_past = list(ids), past
        return logits[0, -1]

    def _step(self, token: int) -> np.ndarray:
        ids, past = self._cached_ids, self._cached_past
        if past is None:  # a failed run cleared the cache: there is nothing to continue
            raise _err(GenerationError, "no evaluated prompt to continue", "start the generation again")
        self._cached_ids, self._cached_past = [], None
        logits, past = self._run(np.asarray([[token]], dtype=np.int64), past)
        self._cached_ids, self._cached_past = [*ids, token], past
        return logits[0, -1]

    def _is_end(self, token: int) -> bool:
        return token in self.eos_ids

    def _text_decoder(self) -> TextDecoder:
        return _TokenizerDecoder(self._tok)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._session = None
            self._cached_ids, self._cached_past = [], None


class _TokenizerDecoder(TextDecoder):
    """Decodes the whole output so far and releases what is new once no character is cut in half."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._full = ""
        self._emitted = ""

    def push(self, token: int) -> str:
        self._ids.append(token)
        self._full = self._tok.decode(self._ids, skip_special_tokens=True)
        if self._full.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return ""
        new, self._emitted = self._full[len(self._emitted) :], self._full
        return new

    def finish(self) -> str:
        rest, self._emitted = self._full[len(self._emitted) :], self._full
        return rest

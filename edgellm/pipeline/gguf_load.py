"""Read a GGUF of a supported family back into torch: the frozen base LoRA adapters train on.

    model = load_gguf_model("slot/model.gguf")          # LlamaLM, eval mode, requires_grad False
    tok = gguf_tokenizer("slot/model.gguf")             # tokenizers.Tokenizer from the GGUF vocab

A device trains on the exact model it serves, so the base comes from its GGUF, not from a
checkpoint it does not have. gguf-py dequantizes every tensor to float32 (F32, F16, Q8_0, Q4_0,
K-quants...); tensor names and the family come from :mod:`edgellm.runtime.families` (llama.cpp's
``llama``, ``qwen2``, ``qwen3``); for the ``llama`` architecture the Q/K rows llama.cpp stores in
adjacent-pair RoPE order are permuted back to the rotate-half order of
:class:`edgellm.pipeline.model.LlamaLM` (the inverse of the exporter's ``permute_rope_rows``). llama3-style RoPE scaling (a ``rope_freqs`` tensor) is applied to the
model's inverse frequencies as llama.cpp does.

Metadata is bounded before anything is allocated: a GGUF is parsed here only after its hash was
verified (the agent verifies the slot first), but a wrong file must still fail with a clear error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgellm.errors import BuildError
from edgellm.pipeline.config import ModelConfig
from edgellm.pipeline.model import LlamaLM, expected_shapes, rope_inv_freq
from edgellm.runtime.families import FAMILIES, GGUF_ARCHS, Family, tensor_suffixes

log = logging.getLogger(__name__)

_HINT = (
    "the file is not a GGUF of a supported family written by edgellm or llama.cpp: check the slot, or rebuild the model"
)
# Bounds on the metadata that sizes allocations (far beyond any model a device could train).
_MAX = {
    "embedding_length": 1 << 15,
    "block_count": 256,
    "feed_forward_length": 1 << 17,
    "attention.head_count": 1024,
    "attention.head_count_kv": 1024,
    "context_length": 1 << 20,
    "key_length": 1024,
}
_MAX_VOCAB = 1 << 20

#: GGUF tensor name -> LlamaLM tensor name: the exporter's mapping, inverted (one source of truth)
_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _family(arch: Any) -> Family:
    """The family a GGUF architecture is read as (``llama`` covers Llama, SmolLM2 and Mistral)."""
    if arch not in GGUF_ARCHS:
        raise BuildError(
            f"GGUF architecture {arch!r} is not supported for training",
            hint=f"supported GGUF architectures: {', '.join(GGUF_ARCHS)}",
        )
    return next(f for f in FAMILIES.values() if f.gguf_arch == arch)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp adjacent-pair row order -> HF rotate-half order (inverse of ``permute_rope_rows``)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise BuildError(f"cannot split a {w.shape} projection into {n_heads} heads", hint=_HINT)
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reader(path: str | Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path), "r")
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise BuildError(f"{path}: unreadable GGUF ({e})", hint=_HINT) from e


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise BuildError(f"GGUF metadata {key!r} is malformed ({e})", hint=_HINT) from e


def _int(reader: Any, arch: str, key: str, default: int | None = None) -> int:
    v = _field(reader, f"{arch}.{key}", default)
    if v is None or isinstance(v, (str, list)) or not 1 <= int(v) <= _MAX.get(key, 1 << 20):
        raise BuildError(f"GGUF metadata {arch}.{key} is missing or out of range ({v!r})", hint=_HINT)
    return int(v)


def gguf_config(reader: Any) -> ModelConfig:
    """The ModelConfig a GGUF describes (bounded, validated)."""
    arch = _field(reader, "general.architecture")
    family = _family(arch)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens.data) if tokens is not None else 0
    if not 1 <= n_vocab <= _MAX_VOCAB:
        raise BuildError(f"GGUF vocabulary size {n_vocab} is out of range", hint=_HINT)
    hidden, heads = _int(reader, arch, "embedding_length"), _int(reader, arch, "attention.head_count")
    head_dim = _field(reader, f"{arch}.attention.key_length")
    scaling = None
    if _field(reader, f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))}

    def tok_id(name: str) -> int | None:
        v = _field(reader, f"tokenizer.ggml.{name}_token_id")
        return int(v) if v is not None and 0 <= int(v) < n_vocab else None

    return ModelConfig(
        vocab_size=n_vocab,
        hidden_size=hidden,
        intermediate_size=_int(reader, arch, "feed_forward_length"),
        num_hidden_layers=_int(reader, arch, "block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_int(reader, arch, "attention.head_count_kv", heads),
        head_dim=_int(reader, arch, "attention.key_length") if head_dim is not None else None,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=_int(reader, arch, "context_length", 2048),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        bos_token_id=tok_id("bos"),
        eos_token_id=tok_id("eos"),
        pad_token_id=tok_id("padding"),
        model_type=family.model_type,
    )


def _torch_name(gname: str, block: dict[str, str]) -> str | None:
    """LlamaLM's name for GGUF tensor ``gname``; ``block`` maps per-layer GGUF names to HF names
    (the exporter's mapping for the family, inverted: one source of truth)."""
    if gname in _TOP:
        return _TOP[gname]
    blk, _, rest = gname.partition(".")
    idx, _, suffix = rest.partition(".")
    if blk == "blk" and idx.isdigit() and suffix in block:
        return f"model.layers.{int(idx)}.{block[suffix]}"
    return None


def _dequantize(t: Any) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        arr = dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise BuildError(
            f"tensor {t.name}: type {t.tensor_type.name} cannot be dequantized here",
            hint="serve an F16, Q8_0, Q4_0 or K-quant GGUF to train on it",
        ) from e
    arr = np.asarray(arr, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
    return arr if arr.flags.writeable else arr.copy()  # F32 tensors are read-only views of the mapped file


def load_gguf_model(path: str | Path) -> LlamaLM:
    """The frozen float32 base model a GGUF holds, in LlamaLM's layout (eval mode)."""
    reader = _reader(path)
    cfg = gguf_config(reader)
    shapes = expected_shapes(cfg)
    block = {gguf_name: hf_name for hf_name, gguf_name in tensor_suffixes(cfg.family).items()}
    tensors: dict[str, torch.Tensor] = {}
    rope_freqs = None
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            rope_freqs = torch.from_numpy(_dequantize(t).reshape(-1).copy())
            continue
        name = _torch_name(t.name, block)
        if name is None:
            raise BuildError(f"{path}: unexpected tensor {t.name!r}", hint=_HINT)
        want = shapes.get(name)
        got = tuple(int(d) for d in reversed(t.shape))
        if want is None or got != want:
            raise BuildError(f"{path}: tensor {t.name} has shape {got}, the metadata implies {want}", hint=_HINT)
        arr = _dequantize(t)
        if cfg.family.rope_permuted and t.name.endswith("attn_q.weight"):
            arr = unpermute_rope_rows(arr, cfg.num_attention_heads)
        elif cfg.family.rope_permuted and t.name.endswith("attn_k.weight"):
            arr = unpermute_rope_rows(arr, cfg.num_key_value_heads)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(arr))
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise BuildError(f"{path}: missing tensors {missing[:3]}", hint=_HINT)
    with torch.device("meta"):  # no random init: the weights are the GGUF's (one float32 copy in memory)
        model = LlamaLM(cfg)
    model.load_state_dict(tensors, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg)
    if rope_freqs is not None:
        if rope_freqs.shape != model.inv_freq.shape:
            raise BuildError(
                f"{path}: rope_freqs has {rope_freqs.numel()} entries, expected {model.inv_freq.numel()}", hint=_HINT
            )
        model.inv_freq = model.inv_freq / rope_freqs  # llama.cpp divides each frequency
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def gguf_tokenizer(path: str | Path) -> Any:
    """A ``tokenizers.Tokenizer`` equal to the GGUF's byte-level BPE vocabulary (``gpt2`` model)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    from edgellm.pipeline.export.gguf_vocab import (
        CONTROL,
        LLAMA3_REGEX,
        NORMALIZER_KEY,
        QWEN2_REGEX,
        USER_DEFINED,
    )

    reader = _reader(path)
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise BuildError(
            f"{path}: tokenizer type {_field(reader, 'tokenizer.ggml.model')!r} is not supported",
            hint="put the model's tokenizer.json in the bundle, or use a byte-level BPE (gpt2) GGUF",
        )
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    types = list(_field(reader, "tokenizer.ggml.token_type") or [])
    merges = [tuple(m.split(" ", 1)) for m in (_field(reader, "tokenizer.ggml.merges") or [])]
    if len(tokens) > _MAX_VOCAB or any(len(m) != 2 for m in merges):
        raise BuildError(f"{path}: malformed tokenizer vocabulary", hint=_HINT)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre in ("llama3", "qwen2"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_REGEX if pre == "llama3" else QWEN2_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if _field(reader, NORMALIZER_KEY) == "NFC":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty in (CONTROL, USER_DEFINED)
    ]
    if special:
        tok.add_special_tokens(special)
    return tok


def write_gguf_tokenizer(path: str | Path, out_dir: str | Path) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` equal to the GGUF's tokenizer (its special
    tokens, add-bos/eos flags and chat template) into a model directory, so the directory exports
    back to a GGUF that tokenizes and chats as the original did."""
    import json

    reader = _reader(path)
    tokens = _field(reader, "tokenizer.ggml.tokens") or []

    def content(name: str) -> str | None:
        v = _field(reader, f"tokenizer.ggml.{name}_token_id")
        return tokens[int(v)] if v is not None and 0 <= int(v) < len(tokens) else None

    out = Path(out_dir)
    gguf_tokenizer(path).save(str(out / "tokenizer.json"))
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
    }
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        if (c := content(name)) is not None:
            cfg[key] = c
    template = _field(reader, "tokenizer.chat_template")
    if isinstance(template, str) and template:
        cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")

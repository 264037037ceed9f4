"""Export a Llama-family HF-format model directory to GGUF (llama.cpp's format).

    export_gguf(model_dir, out_path, fmt) -> report dict

``model_dir`` is an HF-format directory (config.json with LlamaForCausalLM fields,
model.safetensors or a sharded index, tokenizer.json, tokenizer_config.json) — ours or one written
by transformers' ``save_pretrained``. F32/F16 are written directly with gguf-py; every quantized
format is produced by llama.cpp's own quantizer from an F32 GGUF (:mod:`edgellm.pipeline.export.quantize_gguf`),
and the tensor types are read back to report what each tensor became.

Layout (see FIELD-NOTES): torch Linear weights keep their (out, in) shape; norms stay F32; Q and K
rows are permuted from HF's rotate-half RoPE layout to llama.cpp's adjacent-pair layout.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import BuildError
from edgellm.pipeline.export.gguf_vocab import read_vocab

log = logging.getLogger(__name__)

#: export format -> (llama.cpp ftype name, LLAMA_FTYPE value)
FORMATS: dict[str, tuple[str, int]] = {
    "gguf-f32": ("F32", 0),
    "gguf-f16": ("F16", 1),
    "gguf-q8_0": ("Q8_0", 7),
    "gguf-q6_k": ("Q6_K", 18),
    "gguf-q5_k_m": ("Q5_K_M", 17),
    "gguf-q4_k_m": ("Q4_K_M", 15),
    "gguf-q4_0": ("Q4_0", 2),
}

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp adjacent-pair order, per head (Q: heads, K: kv-heads)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise BuildError(f"cannot permute a {w.shape} projection into {n_heads} heads",
                         hint="config.json head counts do not match the weights")
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise BuildError(f"{path} not found", hint="pass an HF-format model directory (config.json + *.safetensors)")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in archs:
        raise BuildError(f"model type {cfg.get('model_type')!r} is not Llama-family",
                         hint="GGUF export supports LlamaForCausalLM checkpoints")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise BuildError(f"config.json sets {flag}=true, which this exporter does not write",
                             hint="export a Llama model without biases")
    kind = rope_scaling(cfg)[0]
    if kind not in ("default", "linear", "llama3"):
        raise BuildError(f"rope scaling {kind!r} is not supported by this exporter",
                         hint="export a model with default, linear or llama3 RoPE scaling")
    if cfg.get("hidden_act", "silu") != "silu":
        raise BuildError(f"hidden_act {cfg.get('hidden_act')!r} is not SiLU", hint="Llama models use silu")
    return cfg


def rope_scaling(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(kind, parameters) from ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5)."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    return str(params.get("rope_type") or params.get("type") or "default"), params


def llama3_rope_factors(cfg: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors for llama3-style RoPE scaling (llama.cpp's ``rope_freqs`` tensor)."""
    import math

    _, p = rope_scaling(cfg)
    factor = float(p.get("factor", 8.0))
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_ctx = float(p.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (rope_theta(cfg) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _safetensors_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    raise BuildError(f"no model.safetensors in {model_dir}", hint="save the model with safetensors")


def iter_hf_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor, without loading all of them at once."""
    from safetensors import safe_open

    for f in _safetensors_files(model_dir):
        try:
            with safe_open(str(f), framework="numpy") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name).astype(np.float32)
        except TypeError:  # bfloat16 has no numpy dtype: read through torch
            import torch  # noqa: F401  (build side only)

            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name).float().numpy()


def _gguf_name(hf: str) -> str | None:
    name = hf[len("model."):] if hf.startswith("model.") else hf
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        if rest in _LAYER_MAP:
            return f"blk.{int(idx)}.{_LAYER_MAP[rest]}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise BuildError(f"unexpected tensor {hf!r} in the checkpoint", hint="only Llama-architecture weights can be exported")


def write_gguf(model_dir: str | Path, out_path: str | Path, *, dtype: str = "F32", name: str | None = None) -> dict:
    """Write an F32 or F16 GGUF (norms always F32). Returns a small summary."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = read_config(model_dir)
    n_embd = int(cfg["hidden_size"])
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    n_layer = int(cfg["num_hidden_layers"])
    n_vocab = int(cfg["vocab_size"])
    vocab = read_vocab(model_dir, n_vocab)

    w = gguf.GGUFWriter(str(out_path), "llama")
    w.add_name(name or model_dir.name)
    w.add_vocab_size(n_vocab)
    w.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta(cfg))
    kind, rope_params = rope_scaling(cfg)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope_params["factor"]))
    elif kind == "llama3":  # llama.cpp divides each frequency by rope_freqs[i]
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg, head_dim))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps") or 1e-6))
    w.add_file_type(0 if dtype == "F32" else 1)
    vocab.write(w)

    seen: set[str] = set()
    for hf_name, arr in iter_hf_tensors(model_dir):
        gname = _gguf_name(hf_name)
        if gname is None:
            continue
        if gname.endswith("attn_q.weight"):
            arr = permute_rope_rows(arr, n_head)
        elif gname.endswith("attn_k.weight"):
            arr = permute_rope_rows(arr, n_head_kv)
        if dtype == "F16" and arr.ndim == 2:
            arr = arr.astype(np.float16)
        w.add_tensor(gname, np.ascontiguousarray(arr))
        seen.add(gname)
    missing = {"token_embd.weight", "output_norm.weight"} - seen
    missing |= {f"blk.{i}.{v}" for i in range(n_layer) for v in _LAYER_MAP.values()} - seen
    if missing:
        w.close()
        out_path.unlink(missing_ok=True)
        raise BuildError(f"checkpoint is missing tensors: {sorted(missing)[:5]}...",
                         hint="the safetensors file does not match config.json")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tied_embeddings": "output.weight" not in seen, "n_params_tensors": len(seen),
            "tokenizer_pre": vocab.pre, "vocab_size": n_vocab}


def export_gguf(model_dir: str | Path, out_path: str | Path, fmt: str, *, nthread: int = 1) -> dict:
    """Export ``model_dir`` to ``out_path`` in ``fmt`` (one of :data:`FORMATS`).

    Returns a report: format, ftype, size_bytes, per-tensor types read back with GGUFReader,
    and ``fallbacks`` (tensors the quantizer left in another type, with the reason).
    """
    from edgellm.pipeline.export.quantize_gguf import quantize, tensor_report

    if fmt not in FORMATS:
        raise BuildError(f"unknown GGUF format {fmt!r}", hint=f"choose one of {', '.join(FORMATS)}")
    ftype_name, ftype = FORMATS[fmt]
    model_dir, out_path = Path(model_dir), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(dir=out_path.parent, prefix=".export-", suffix=".gguf")[1])
    try:
        if ftype_name in ("F32", "F16"):
            summary = write_gguf(model_dir, tmp, dtype=ftype_name)
            source_size = None
        else:
            src = tmp.with_suffix(".f32.gguf")
            try:
                summary = write_gguf(model_dir, src, dtype="F32")
                source_size = src.stat().st_size
                quantize(src, tmp, ftype, nthread=nthread)
            finally:
                src.unlink(missing_ok=True)
        report = tensor_report(tmp, ftype_name)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    report.update({"format": fmt, "path": str(out_path), "size_bytes": out_path.stat().st_size,
                   "f32_size_bytes": source_size, **summary})
    for fb in report["fallbacks"]:
        log.warning("%s: tensor %s is %s instead of %s (%s)", fmt, fb["tensor"], fb["type"], fb["expected"], fb["reason"])
    return report

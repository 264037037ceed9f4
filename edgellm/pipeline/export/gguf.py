"""Export an HF-format model directory of a supported family to GGUF (llama.cpp's format).

    export_gguf(model_dir, out_path, fmt) -> report dict

``model_dir`` is an HF-format directory (config.json of a family in :mod:`edgellm.runtime.families`,
model.safetensors or a sharded index, tokenizer.json or tokenizer.model, tokenizer_config.json) —
ours or one written by transformers' ``save_pretrained``. The family decides llama.cpp's
architecture name and tensor names (:func:`edgellm.runtime.families.tensor_suffixes`). F32/F16 are written directly with gguf-py; every quantized
format is produced by llama.cpp's own quantizer from an F32 GGUF (:mod:`edgellm.pipeline.export.quantize_gguf`),
and the tensor types are read back to report what each tensor became.

Layout: torch Linear weights keep their (out, in) shape; norms and biases stay F32; for llama.cpp's
``llama`` architecture Q and K rows are permuted from HF's rotate-half RoPE layout to llama.cpp's
adjacent-pair layout (Qwen's architectures rotate halves, as HF does). Mistral's sliding window is
not an attention option of llama.cpp's ``llama`` architecture, so the GGUF's context is capped at
the window, where both agree exactly.
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
from edgellm.runtime.families import Family, family_of, tensor_suffixes

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


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp adjacent-pair order, per head (Q: heads, K: kv-heads)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise BuildError(
            f"cannot permute a {w.shape} projection into {n_heads} heads",
            hint="config.json head counts do not match the weights",
        )
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise BuildError(f"{path} not found", hint="pass an HF-format model directory (config.json + *.safetensors)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BuildError(f"{path}: not a readable JSON config ({e})", hint="re-save the model") from e
    if not isinstance(cfg, dict):
        raise BuildError(f"{path}: config must be a JSON object", hint="re-save the model")
    family_of(cfg, str(path))
    kind = rope_scaling(cfg)[0]
    if kind not in ("default", "linear", "llama3"):
        raise BuildError(
            f"rope scaling {kind!r} is not supported by this exporter",
            hint="export a model with default, linear or llama3 RoPE scaling",
        )
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


def _gguf_name(hf: str, layer_map: dict[str, str]) -> str | None:
    name = hf[len("model.") :] if hf.startswith("model.") else hf
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        if rest in layer_map:
            return f"blk.{int(idx)}.{layer_map[rest]}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise BuildError(
        f"unexpected tensor {hf!r} in the checkpoint",
        hint="the weights do not match config.json's model_type: re-save the model with its own config",
    )


def _context_length(cfg: dict[str, Any], fam: Family) -> int:
    ctx = int(cfg.get("max_position_embeddings") or 2048)
    window = cfg.get("sliding_window")
    if fam.sliding_window and isinstance(window, int) and 0 < window < ctx:
        log.warning(
            "%s: sliding window %d < context %d; the GGUF's context is capped at %d", fam.hf_class, window, ctx, window
        )
        return window
    return ctx


def _write_hparams(w: Any, cfg: dict[str, Any], fam: Family, dtype: str) -> None:
    import gguf

    n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    w.add_vocab_size(int(cfg["vocab_size"]))
    w.add_context_length(_context_length(cfg, fam))
    w.add_embedding_length(n_embd)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or n_head))
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


def write_gguf(model_dir: str | Path, out_path: str | Path, *, dtype: str = "F32", name: str | None = None) -> dict:
    """Write an F32 or F16 GGUF (norms and biases always F32). Returns a small summary."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = read_config(model_dir)
    fam = family_of(cfg)
    layer_map = tensor_suffixes(fam)
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    n_layer = int(cfg["num_hidden_layers"])
    vocab = read_vocab(model_dir, int(cfg["vocab_size"]))

    w = gguf.GGUFWriter(str(out_path), fam.gguf_arch)
    w.add_name(name or model_dir.name)
    _write_hparams(w, cfg, fam, dtype)
    vocab.write(w)

    seen: set[str] = set()
    for hf_name, arr in iter_hf_tensors(model_dir):
        gname = _gguf_name(hf_name, layer_map)
        if gname is None:
            continue
        if fam.rope_permuted and gname.endswith("attn_q.weight"):
            arr = permute_rope_rows(arr, n_head)
        elif fam.rope_permuted and gname.endswith("attn_k.weight"):
            arr = permute_rope_rows(arr, n_head_kv)
        if dtype == "F16" and arr.ndim == 2:
            arr = arr.astype(np.float16)
        w.add_tensor(gname, np.ascontiguousarray(arr))
        seen.add(gname)
    missing = {"token_embd.weight", "output_norm.weight"} - seen
    missing |= {f"blk.{i}.{v}" for i in range(n_layer) for v in layer_map.values()} - seen
    if missing:
        w.close()
        out_path.unlink(missing_ok=True)
        raise BuildError(
            f"checkpoint is missing tensors: {sorted(missing)[:5]}...",
            hint="the safetensors file does not match config.json",
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {
        "tied_embeddings": "output.weight" not in seen,
        "n_params_tensors": len(seen),
        "tokenizer_pre": vocab.pre,
        "tokenizer_model": vocab.model,
        "vocab_size": int(cfg["vocab_size"]),
        "architecture": fam.gguf_arch,
        "family": fam.model_type,
        "chat_template": "model's own" if vocab.chat_template else "none",
    }


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
    report.update(
        {
            "format": fmt,
            "path": str(out_path),
            "size_bytes": out_path.stat().st_size,
            "f32_size_bytes": source_size,
            **summary,
        }
    )
    for fb in report["fallbacks"]:
        log.warning(
            "%s: tensor %s is %s instead of %s (%s)", fmt, fb["tensor"], fb["type"], fb["expected"], fb["reason"]
        )
    return report

"""Export LoRA adapters to llama.cpp's LoRA adapter GGUF (the format its own converter writes).

    write_lora_gguf(state, lora_cfg, model_dir, "adapter.gguf", dtype="F16") -> summary dict

``state`` holds the adapter tensors of :mod:`edgellm.pipeline.lora` (``layers.N.self_attn.q_proj.lora_A``
(rank, in), ``...lora_B`` (out, rank)). The file llama.cpp loads with ``llama_adapter_lora_init``:

- metadata ``general.architecture`` (the base's: ``llama``, ``qwen2``...), ``general.type = "adapter"``, ``adapter.type = "lora"``,
  ``adapter.lora.alpha`` (llama.cpp scales the product by ``alpha / rank``, as training did);
- tensors ``blk.N.<base tensor>.weight.lora_a`` and ``.lora_b`` named after the base tensor they
  patch. A torch ``(rank, in)`` array is ggml ``ne = [in, rank]`` and ``(out, rank)`` is
  ``ne = [rank, out]``: exactly the shapes llama.cpp checks against the base tensor, so both keep
  their torch layout.
- For llama.cpp's ``llama`` architecture the base exporter permutes Q and K rows from rotate-half
  to adjacent-pair RoPE order (``W' = P W``); the adapter's delta ``B A`` must follow, so ``lora_b``
  rows of Q and K get the same permutation (``P B A``). Families that rotate halves (Qwen) keep both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import BuildError
from edgellm.pipeline.export.gguf import permute_rope_rows, read_config
from edgellm.runtime.families import Family, family_of, tensor_suffixes

#: llama.cpp's metadata for an adapter (gguf-py's Keys.Adapter)
GENERAL_TYPE = "adapter"
ADAPTER_TYPE = "lora"


def gguf_lora_name(key: str, fam: Family) -> str:
    """``layers.3.self_attn.q_proj.lora_A`` -> ``blk.3.attn_q.weight.lora_a``."""
    try:
        _layers, idx, rest = key.split(".", 2)
        module, ab = rest.rsplit(".", 1)
        base = tensor_suffixes(fam)[module + ".weight"]
        suffix = {"lora_A": "lora_a", "lora_B": "lora_b"}[ab]
        return f"blk.{int(idx)}.{base}.{suffix}"
    except (ValueError, KeyError) as e:
        raise BuildError(
            f"adapter tensor {key!r} has no llama.cpp name",
            hint="adapters must come from edgellm's LoRA (q/k/v/o and gate/up/down projections)",
        ) from e


def write_lora_gguf(
    state: dict[str, Any],
    rank: int,
    alpha: float,
    model_dir: str | Path,
    out_path: str | Path,
    *,
    dtype: str = "F16",
    name: str | None = None,
) -> dict[str, Any]:
    """Write the adapters in ``state`` (for the model in ``model_dir``) as a llama.cpp LoRA GGUF."""
    import gguf

    if dtype not in ("F32", "F16"):
        raise BuildError(f"adapter dtype {dtype!r}", hint="use F32 or F16")
    cfg = read_config(Path(model_dir))
    fam = family_of(cfg)
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    out_path = Path(out_path)
    w = gguf.GGUFWriter(str(out_path), fam.gguf_arch)
    w.add_type(GENERAL_TYPE)
    w.add_string(gguf.Keys.Adapter.TYPE, ADAPTER_TYPE)
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    if name:
        w.add_name(name)
    n_params = 0
    for key in sorted(state):
        arr = np.asarray(
            state[key].detach().cpu().numpy() if hasattr(state[key], "detach") else state[key], dtype=np.float32
        )
        gname = gguf_lora_name(key, fam)
        if fam.rope_permuted and gname.endswith("attn_q.weight.lora_b"):
            arr = permute_rope_rows(arr, n_head)
        elif fam.rope_permuted and gname.endswith("attn_k.weight.lora_b"):
            arr = permute_rope_rows(arr, n_head_kv)
        if dtype == "F16":
            arr = arr.astype(np.float16)
        w.add_tensor(gname, np.ascontiguousarray(arr))
        n_params += arr.size
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {
        "format": f"gguf-lora-{dtype.lower()}",
        "rank": rank,
        "alpha": float(alpha),
        "tensors": len(state),
        "params": int(n_params),
        "size_bytes": out_path.stat().st_size,
    }

"""The model families edgellm supports, described once.

Every family is a decoder with RMSNorm, rotary position embeddings, SwiGLU and grouped-query
attention; they differ only in the few facts a :class:`Family` records. The torch model, the
checkpoint loader, the GGUF exporter and the docs read this table; nothing else branches on
``model_type``. A checkpoint of any other family is refused before any work starts.

No torch, nothing of the pipeline: the config reader, the exporters and the runtime GGUF checks
import it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edgellm.errors import BuildError


@dataclasses.dataclass(frozen=True)
class Family:
    """One supported architecture, as Hugging Face and llama.cpp name it."""

    #: ``model_type`` in config.json
    model_type: str
    #: ``architectures[0]`` in config.json
    hf_class: str
    #: llama.cpp's ``general.architecture``
    gguf_arch: str
    #: q/k/v projections always carry a bias (o_proj does not)
    qkv_bias: bool = False
    #: per-head RMSNorm on queries and keys before RoPE (``q_norm``/``k_norm``)
    qk_norm: bool = False
    #: the sliding-window size from config.json applies to every layer
    sliding_window: bool = False
    #: what the docs call it
    label: str = ""

    @property
    def rope_permuted(self) -> bool:
        """llama.cpp's ``llama`` architecture rotates adjacent pairs: Q/K rows must be permuted
        from HF's rotate-half order. Qwen's architectures rotate halves (NEOX), as HF does."""
        return self.gguf_arch == "llama"


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", "llama", label="Llama 1/2/3.x, SmolLM2, TinyLlama"),
        Family("mistral", "MistralForCausalLM", "llama", sliding_window=True, label="Mistral"),
        Family("qwen2", "Qwen2ForCausalLM", "qwen2", qkv_bias=True, label="Qwen2, Qwen2.5"),
        Family("qwen3", "Qwen3ForCausalLM", "qwen3", qk_norm=True, label="Qwen3"),
    )
}

#: llama.cpp architectures a GGUF written by edgellm may carry
GGUF_ARCHS: tuple[str, ...] = tuple(sorted({f.gguf_arch for f in FAMILIES.values()}))


def supported() -> str:
    """The supported families, for error messages and docs."""
    return "; ".join(f"{f.hf_class} ({f.label})" for f in FAMILIES.values())


def family_of(cfg: dict[str, Any], where: str = "config.json") -> Family:
    """The family a config.json describes; refuses anything outside :data:`FAMILIES`."""
    mt = cfg.get("model_type")
    archs = cfg.get("architectures")
    if mt is None and archs is None:  # a bare edgellm/preset config
        return FAMILIES["llama"]
    if archs is not None and (not isinstance(archs, list) or len(archs) != 1):
        raise BuildError(
            f"{where}: architectures must name one class (got {archs!r})", hint=f"supported: {supported()}"
        )
    fam = FAMILIES.get(mt) if isinstance(mt, str) else None
    by_class = next((f for f in FAMILIES.values() if archs and archs[0] == f.hf_class), None)
    if fam is None or (by_class is not None and by_class is not fam) or (archs and by_class is None):
        raise BuildError(
            f"{where}: model_type {mt!r} / architectures {archs} is not a supported family",
            hint=f"edgellm supports {supported()}; convert the model to one of them",
        )
    check_family_options(fam, cfg, where)
    return fam


def check_family_options(fam: Family, cfg: dict[str, Any], where: str) -> None:
    """Refuse options of a supported family that no exporter reproduces."""
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise BuildError(
            f"{where}: hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)",
            hint="these families use silu: fix config.json",
        )
    if not fam.sliding_window and cfg.get("use_sliding_window"):
        raise BuildError(
            f"{where}: use_sliding_window=true is not supported for {fam.hf_class}",
            hint="set use_sliding_window to false (Qwen checkpoints ship with it off)",
        )
    if cfg.get("mlp_bias"):
        raise BuildError(f"{where}: mlp_bias=true is not supported", hint="use a checkpoint without MLP biases")
    if cfg.get("attention_bias"):
        raise BuildError(
            f"{where}: attention_bias=true is not supported for {fam.hf_class}",
            hint="use a checkpoint without attention-projection biases",
        )
    for key in ("num_experts", "num_local_experts"):
        if cfg.get(key):
            raise BuildError(f"{where}: mixture-of-experts models are not supported", hint=f"supported: {supported()}")


def tensor_suffixes(fam: Family) -> dict[str, str]:
    """HF per-layer tensor name -> llama.cpp per-layer tensor name, for this family."""
    names = {
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
    if fam.qkv_bias:
        names.update(
            {
                "self_attn.q_proj.bias": "attn_q.bias",
                "self_attn.k_proj.bias": "attn_k.bias",
                "self_attn.v_proj.bias": "attn_v.bias",
            }
        )
    if fam.qk_norm:
        names.update({"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"})
    return names

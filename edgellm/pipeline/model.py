"""The decoder of every supported family in torch, and the Hugging Face model directory format.

One module tree serves Llama, Mistral, Qwen2 and Qwen3 (:mod:`edgellm.runtime.families` says what
differs: q/k/v biases, q/k norms, a sliding window). It mirrors ``transformers``' ``*ForCausalLM``
so ``state_dict()`` keys are the HF tensor names (``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``, ...,
``model.norm.weight``, ``lm_head.weight``). A model directory holds::

    config.json               *ForCausalLM fields (see edgellm.pipeline.config.ModelConfig)
    model.safetensors         or model-0000x-of-0000y.safetensors + model.safetensors.index.json
    tokenizer.json            byte-level BPE (edgellm.pipeline.tokenizer), or a sentencepiece tokenizer.model
    tokenizer_config.json     special tokens + jinja chat_template
    generation_config.json    bos/eos ids

``forward(input_ids, past)`` takes and returns a per-layer KV cache ``[(k, v), ...]`` with
``k, v: [batch, n_kv_heads, past_len, head_dim]``; positions continue after ``past_len``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.errors import BuildError
from edgellm.pipeline._atomic import atomic_dir
from edgellm.pipeline.config import PRESETS, ModelConfig, resolve_config  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

KV = tuple[torch.Tensor, torch.Tensor]


# ---- layers ---------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with HF's ``llama3`` / ``linear`` rope scaling when configured."""
    dim = cfg.head_dim_
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        inv = inv / float(rs["factor"])
    elif kind == "llama3":
        factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        inv_l = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wl < hi_wl) * ~(wl > lo_wl)
        inv = torch.where(medium, smoothed, inv_l)
    elif kind not in (None, "default"):
        raise BuildError(f"rope scaling {kind!r} is not supported", hint="supported: default, linear, llama3")
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_
        fam = cfg.family
        b = fam.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if fam.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if fam.qk_norm else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, past: KV | None
    ) -> tuple[torch.Tensor, KV]:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.hd)
        k = self.k_proj(x).view(B, S, self.n_kv, self.hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        rep = self.n_heads // self.n_kv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        att = torch.matmul(q, k.transpose(2, 3)) * (1.0 / math.sqrt(self.hd))
        att = att + mask
        att = torch.softmax(att.float(), dim=-1).to(q.dtype)
        out = torch.matmul(att, v).transpose(1, 2).reshape(B, S, self.n_heads * self.hd)
        return self.o_proj(out), present


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class _Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaLM(nn.Module):
    """Causal LM with HF ``*ForCausalLM`` tensor names (every family of edgellm.runtime.families)."""

    inv_freq: torch.Tensor  # a registered (non-persistent) buffer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.reset_parameters()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_parameters(self, std: float = 0.02) -> None:
        n = max(1, self.config.num_hidden_layers)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                s = std / math.sqrt(2 * n) if name.endswith(("o_proj", "down_proj")) else std
                nn.init.normal_(m.weight, 0.0, s)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, past: list[KV] | None = None) -> tuple[torch.Tensor, list[KV]]:
        """Logits ``[B, S, V]`` (float32) and the updated cache."""
        B, S = input_ids.shape
        P = past[0][0].shape[2] if past else 0
        x = self.model.embed_tokens(input_ids)
        pos = torch.arange(S, device=input_ids.device) + P
        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        kpos = torch.arange(P + S, device=input_ids.device)
        visible = kpos[None, :] <= pos[:, None]
        if self.config.window is not None:  # Mistral: only the last `window` positions
            visible = visible & (kpos[None, :] > pos[:, None] - self.config.window)
        mask = torch.where(visible, 0.0, float("-inf")).to(x.dtype)
        presents: list[KV] = []
        for i, layer in enumerate(self.model.layers):
            x, pr = layer(x, cos, sin, mask, past[i] if past else None)
            presents.append(pr)
        logits = self.lm_head(self.model.norm(x)).float()
        return logits, presents


# ---- greedy / sampled generation in torch (reference for parity tests) ---------------------
@torch.no_grad()
def generate_ids(
    model: LlamaLM, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int] | None = None
) -> list[int]:
    """Greedy decoding with the KV cache; stops at an EOS id (not included)."""
    model.eval()
    logits, past = model(torch.tensor([prompt_ids]))
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        if eos_ids and nxt in eos_ids:
            break
        out.append(nxt)
        if len(prompt_ids) + len(out) >= model.config.max_position_embeddings:
            break
        logits, past = model(torch.tensor([[nxt]]), past)
    return out


# ---- model directory I/O --------------------------------------------------------------------
def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    H, FF, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim_
    nq, nkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (nq, H),
                p + "self_attn.k_proj.weight": (nkv, H),
                p + "self_attn.v_proj.weight": (nkv, H),
                p + "self_attn.o_proj.weight": (H, nq),
                p + "mlp.gate_proj.weight": (FF, H),
                p + "mlp.up_proj.weight": (FF, H),
                p + "mlp.down_proj.weight": (H, FF),
                p + "input_layernorm.weight": (H,),
                p + "post_attention_layernorm.weight": (H,),
            }
        )
        if cfg.family.qkv_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (nq,),
                    p + "self_attn.k_proj.bias": (nkv,),
                    p + "self_attn.v_proj.bias": (nkv,),
                }
            )
        if cfg.family.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    hint = "the file is corrupted or truncated: copy or download it again, or rebuild the model"
    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise BuildError(f"{path}: weights file is missing", hint="the model directory is incomplete") from e
    if size < 8:
        raise BuildError(f"{path}: truncated safetensors file ({size} bytes)", hint=hint)
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
    if header_len > min(size - 8, 100 * 2**20):
        raise BuildError(f"{path}: corrupted safetensors header (length {header_len} > file size {size})", hint=hint)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BuildError(f"{path}: unreadable safetensors file ({e})", hint=hint) from e


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory (single file or sharded with an index)."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.exists():
        return _read_safetensors(single)
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BuildError(
                f"{index}: malformed shard index ({e})",
                hint="it must be a JSON object with a 'weight_map' of tensor name -> file",
            ) from e
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if "/" in shard or "\\" in shard or shard.startswith("."):
                raise BuildError(
                    f"{index}: shard name {shard!r} is not a plain file name",
                    hint="the index must name files inside the model directory",
                )
            tensors.update(_read_safetensors(model_dir / shard))
        return tensors
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise BuildError(
            f"{model_dir}: only pickle weights (*.bin/*.pt) found; edgellm never loads pickles",
            hint="convert them to safetensors with transformers (save_pretrained(safe_serialization=True))",
        )
    raise BuildError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json",
        hint="pass a Hugging Face-format model directory (config.json + *.safetensors + tokenizer.json)",
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BuildError(
            f"{model_dir}: not a model directory",
            hint="pass a directory with config.json, model.safetensors and tokenizer.json",
        )
    return ModelConfig.from_file(model_dir / "config.json")


def load_model(model_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> LlamaLM:
    """Load a Hugging Face-format Llama model directory into :class:`LlamaLM` (eval mode)."""
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    tensors = read_weights(model_dir)
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    expected = expected_shapes(cfg)
    lm_head = tensors.pop("lm_head.weight", None)
    if not cfg.tie_word_embeddings:
        if lm_head is None:
            raise BuildError(
                f"{model_dir}: lm_head.weight missing but config.json says tie_word_embeddings=false",
                hint="fix tie_word_embeddings in config.json or re-save the model",
            )
        tensors["lm_head.weight"] = lm_head
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{k} {tuple(tensors[k].shape)} != {v}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != v
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"shape mismatch: {wrong[:3]}")
        raise BuildError(
            f"{model_dir / 'config.json'} does not match the weights: " + "; ".join(parts),
            hint="the config and the safetensors come from different models: use the config.json saved with these weights",
        )
    model = LlamaLM(cfg)
    with torch.no_grad():
        state = {k: v.to(dtype) for k, v in tensors.items()}
        model.load_state_dict(state, strict=False)
    model.to(dtype)
    model.eval()
    return model


def state_for_saving(model: LlamaLM) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_model_files(
    model: LlamaLM, out: Path, *, tokenizer: Any | None = None, metadata: dict[str, str] | None = None
) -> None:
    """Write config/weights(/tokenizer) into an existing directory (no atomicity)."""
    from safetensors.torch import save_file

    cfg = model.config
    (out / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    save_file(state_for_saving(model), str(out / "model.safetensors"), metadata={"format": "pt", **(metadata or {})})
    gen = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "max_length": cfg.max_position_embeddings,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        from edgellm.pipeline.tokenizer import save_tokenizer

        save_tokenizer(tokenizer, out, model_max_length=cfg.max_position_embeddings)


def save_model_dir(
    model: LlamaLM,
    out_dir: str | Path,
    *,
    tokenizer: Any | None = None,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Atomically write a Hugging Face-format model directory.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (writes tokenizer.json + tokenizer_config.json);
    ``extra_files`` maps file names to text (e.g. ``{"train_report.json": ...}``).
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_model_files(model, tmp, tokenizer=tokenizer)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out_dir


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    import shutil

    for name in (
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ):
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)

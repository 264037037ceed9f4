"""LoRA adapters on edgellm's LlamaLM: wrap, train, exchange, merge.

    cfg = LoraConfig(rank=8, alpha=16.0)
    model = load_gguf_model("model.gguf")             # frozen base (QLoRA-style: a dequantized GGUF)
    apply_lora(model, cfg)                             # q/k/v/o and gate/up/down projections
    stats = train_lora(model, tok, texts, cfg, steps=20, lr=1e-3, heldout=val_texts)
    update = lora_state(model)                         # {"layers.0.self_attn.q_proj.lora_A": (r, in), ...}
    merge_lora(model)                                  # W += B @ A * alpha / r, back to plain Linear

Adapter keys are the module path inside ``LlamaLM.model`` (``layers.N.self_attn.q_proj``,
``layers.N.mlp.down_proj``) plus ``.lora_A`` (rank, in) or ``.lora_B`` (out, rank). Both sides
of a federated run build and check them from :func:`expected_shapes` alone, so a server can
validate a device's tensors without loading a model. A fresh adapter has ``B = 0``: the adapted
model starts exactly equal to the base.

Training reuses the one loop of :mod:`edgellm.pipeline.train` (AdamW, warmup + cosine, gradient
clipping); only the adapter parameters require gradients.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgellm.errors import BuildError
from edgellm.pipeline.config import ModelConfig
from edgellm.pipeline.gguf_load import load_gguf_model  # noqa: F401  (re-exported: part of this API)
from edgellm.pipeline.model import LlamaLM

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
_HINT = "use rank 1..256, alpha > 0 and targets among " + ", ".join(ATTN_TARGETS + MLP_TARGETS)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ATTN_TARGETS + MLP_TARGETS

    def __post_init__(self) -> None:
        ok = (
            isinstance(self.rank, int)
            and 1 <= self.rank <= 256
            and isinstance(self.alpha, (int, float))
            and math.isfinite(self.alpha)
            and self.alpha > 0
            and self.targets
            and set(self.targets) <= set(ATTN_TARGETS + MLP_TARGETS)
        )
        if not ok:
            raise BuildError(
                f"invalid LoRA config (rank {self.rank!r}, alpha {self.alpha!r}, targets {self.targets!r})", hint=_HINT
            )

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank


class LoraLinear(nn.Module):
    """``base(x) + (x @ A.T @ B.T) * alpha / r`` with the base frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.scaling = rank, float(alpha) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scaling


def _target_paths(n_layers: int, targets: Sequence[str]) -> list[str]:
    out = []
    for i in range(n_layers):
        out += [f"layers.{i}.self_attn.{t}" for t in ATTN_TARGETS if t in targets]
        out += [f"layers.{i}.mlp.{t}" for t in MLP_TARGETS if t in targets]
    return out


def expected_shapes(model_cfg: ModelConfig, cfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Adapter key -> shape for a model config: what a valid update must hold, exactly."""
    H, inter, hd = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.head_dim_
    io = {
        "q_proj": (H, model_cfg.num_attention_heads * hd),
        "k_proj": (H, model_cfg.num_key_value_heads * hd),
        "v_proj": (H, model_cfg.num_key_value_heads * hd),
        "o_proj": (model_cfg.num_attention_heads * hd, H),
        "gate_proj": (H, inter),
        "up_proj": (H, inter),
        "down_proj": (inter, H),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for path in _target_paths(model_cfg.num_hidden_layers, cfg.targets):
        n_in, n_out = io[path.rsplit(".", 1)[1]]
        shapes[path + ".lora_A"] = (cfg.rank, n_in)
        shapes[path + ".lora_B"] = (n_out, cfg.rank)
    return shapes


def initial_lora_state(model_cfg: ModelConfig, cfg: LoraConfig, seed: int) -> dict[str, torch.Tensor]:
    """Fresh adapters from a fixed seed (A: kaiming-uniform, B: 0), as :func:`apply_lora` makes them."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in expected_shapes(model_cfg, cfg).items():
        if key.endswith(".lora_B"):
            out[key] = torch.zeros(shape)
        else:
            bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on (rank, in)
            out[key] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
    return out


def _lora_modules(model: LlamaLM) -> dict[str, LoraLinear]:
    return {
        name[len("model.") :]: m
        for name, m in model.named_modules()
        if isinstance(m, LoraLinear) and name.startswith("model.")
    }


def apply_lora(model: LlamaLM, cfg: LoraConfig) -> None:
    """Wrap the targeted Linear layers in place; every base parameter is frozen."""
    if _lora_modules(model):
        raise BuildError("the model already has LoRA adapters", hint="merge_lora(model) first, or load a fresh model")
    for p in model.parameters():
        p.requires_grad_(False)
    for path in _target_paths(model.config.num_hidden_layers, cfg.targets):
        parent_path, attr = ("model." + path).rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, LoraLinear(getattr(parent, attr), cfg.rank, cfg.alpha))


def lora_config_of(model: LlamaLM) -> LoraConfig:
    """The LoraConfig the model's adapters were applied with."""
    mods = _lora_modules(model)
    if not mods:
        raise BuildError("the model has no LoRA adapters", hint="call apply_lora(model, cfg) first")
    first = next(iter(mods.values()))
    targets = tuple(t for t in ATTN_TARGETS + MLP_TARGETS if any(p.endswith("." + t) for p in mods))
    return LoraConfig(rank=first.rank, alpha=first.scaling * first.rank, targets=targets)


def lora_state(model: LlamaLM) -> dict[str, torch.Tensor]:
    """The adapter tensors (detached copies), keyed as :func:`expected_shapes`."""
    out = {}
    for path, m in _lora_modules(model).items():
        out[path + ".lora_A"] = m.lora_A.detach().clone()
        out[path + ".lora_B"] = m.lora_B.detach().clone()
    return out


def check_lora_state(state: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """Exactly the expected keys and shapes, finite values; raises BuildError naming what is wrong."""
    missing, extra = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    wrong = sorted(k for k in shapes if k in state and tuple(state[k].shape) != shapes[k])
    bad = sorted(
        k for k in shapes if k in state and k not in wrong and not bool(torch.isfinite(torch.as_tensor(state[k])).all())
    )
    if missing or extra or wrong or bad:
        raise BuildError(
            f"adapter tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}, "
            f"wrong shape {wrong[:3]}, non-finite {bad[:3]}",
            hint="the adapters were made for another model, rank or target list",
        )


def load_lora_state(model: LlamaLM, state: dict[str, Any]) -> None:
    """Set the adapters from ``state`` (checked against the model's own adapters first)."""
    mods = _lora_modules(model)
    check_lora_state(state, {k: tuple(v.shape) for k, v in lora_state(model).items()})
    with torch.no_grad():
        for path, m in mods.items():
            m.lora_A.copy_(torch.as_tensor(state[path + ".lora_A"]))
            m.lora_B.copy_(torch.as_tensor(state[path + ".lora_B"]))


def merge_lora(model: LlamaLM) -> None:
    """Fold the adapters into the base weights (W += B @ A * alpha / r) and unwrap them."""
    with torch.no_grad():
        for path, m in _lora_modules(model).items():
            m.base.weight.copy_(m.merged_weight())
            parent_path, attr = ("model." + path).rsplit(".", 1)
            setattr(model.get_submodule(parent_path), attr, m.base)


def _stream(model: LlamaLM, tokenizer: Any, texts: Sequence[str]) -> Any:
    from edgellm.pipeline.data import token_stream

    cfg = model.config
    return token_stream(
        tokenizer, list(texts), bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    )


def heldout_windows(
    model: LlamaLM, tokenizer: Any, texts: Sequence[str], seq_len: int = 128, max_windows: int = 16
) -> Any:
    from edgellm.pipeline.data import eval_windows

    seq = min(seq_len, model.config.max_position_embeddings)
    return eval_windows(_stream(model, tokenizer, texts), seq, max_windows)


def heldout_loss(
    model: LlamaLM, tokenizer: Any, texts: Sequence[str], *, seq_len: int = 128, max_windows: int = 16
) -> float:
    """Mean next-token loss (nats) of ``model`` on ``texts`` (one thread, no gradients)."""
    from edgellm.pipeline.train import val_loss

    torch.set_num_threads(1)
    return val_loss(model, heldout_windows(model, tokenizer, texts, seq_len, max_windows))


def train_lora(
    model: LlamaLM,
    tokenizer: Any,
    texts: Sequence[str],
    cfg: LoraConfig,
    steps: int,
    lr: float,
    *,
    heldout: Sequence[str] | None = None,
    batch_size: int = 4,
    seq_len: int = 64,
    seed: int = 0,
    max_seconds: float | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Train the adapters (applied with ``cfg`` if the model has none yet) on ``texts``.

    Returns the loop's summary (``final_train_loss``, ``val_loss`` on ``heldout`` — or on the
    training text when none is given —, ``steps``, ``tokens_trained``, ``seconds``...) plus
    ``num_examples`` (training tokens) and ``trainable_params``.
    """
    from edgellm.pipeline.train import TrainConfig, run_loop

    if not 1 <= steps <= 100_000 or not (math.isfinite(lr) and 0 < lr <= 1.0):
        raise BuildError(
            f"invalid LoRA training settings (steps {steps}, lr {lr})",
            hint="use 1..100000 steps and a learning rate in (0, 1]",
        )
    if not _lora_modules(model):
        apply_lora(model, cfg)
    torch.manual_seed(seed)
    seq = min(seq_len, model.config.max_position_embeddings)
    stream = _stream(model, tokenizer, texts)
    if len(stream) < 2 * seq + 2:  # a short local text: train on shorter windows than asked
        seq = max(8, len(stream) // 2 - 1)
    val = heldout_windows(model, tokenizer, heldout if heldout else texts, seq)
    tcfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq,
        lr=lr,
        warmup_steps=min(10, steps // 5),
        weight_decay=0.0,
        eval_every=0,
        seed=seed,
        threads=threads,
        max_seconds=max_seconds,
        progress=False,
    )
    summary = run_loop(model, tokenizer, stream, val, tcfg, label="lora")
    summary["num_examples"] = int(len(stream))
    summary["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return summary

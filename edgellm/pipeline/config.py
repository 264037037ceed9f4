"""Model configuration: the fields of a Hugging Face ``config.json`` of a supported family
(:mod:`edgellm.runtime.families`: Llama, Mistral, Qwen2, Qwen3).

No torch here: reading or writing a config must not need it. Unknown fields are kept in
``extra`` and written back, so a user's checkpoint round-trips without losing anything.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from edgellm.errors import BuildError
from edgellm.runtime.families import FAMILIES, Family, family_of

_KNOWN = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "torch_dtype",
    "model_type",
    "sliding_window",
)


@dataclasses.dataclass
class ModelConfig:
    """A decoder of one supported family (RMSNorm, RoPE (rotate_half), SwiGLU, grouped-query attention)."""

    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_scaling / rope_parameters (llama3, linear)
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 3
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    torch_dtype: str = "float32"
    model_type: str = "llama"  # the family (edgellm.runtime.families.FAMILIES)
    sliding_window: int | None = None  # Mistral: attention sees only the last N positions
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived -------------------------------------------------------------------------
    @property
    def head_dim_(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def window(self) -> int | None:
        """The attention window when it is shorter than the context (Mistral), else None."""
        w = self.sliding_window
        if self.family.sliding_window and isinstance(w, int) and 0 < w < self.max_position_embeddings:
            return w
        return None

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def validate(self) -> None:
        problems = []
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be a positive integer (got {v!r})")
        if not problems:
            if self.head_dim is None and self.hidden_size % self.num_attention_heads:
                problems.append("hidden_size must be divisible by num_attention_heads")
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append("num_attention_heads must be a multiple of num_key_value_heads")
            if self.head_dim_ % 2:
                problems.append("head_dim must be even (rotary embeddings rotate pairs)")
        if self.model_type not in FAMILIES:
            problems.append(f"model_type {self.model_type!r} is not one of {sorted(FAMILIES)}")
        if self.attention_bias or self.mlp_bias:
            problems.append("attention_bias/mlp_bias are not supported")
        if self.hidden_act not in ("silu", "swish"):
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (only silu)")
        if problems:
            raise BuildError(
                "invalid model config: " + "; ".join(problems),
                hint="fix config.json or the --config file (see docs/models.md)",
            )

    # ---- (de)serialisation ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        family_of(d, "config")
        d = dict(d)
        d.pop("architectures", None)
        for flag in ("attention_bias", "mlp_bias"):  # Qwen2 saves null
            if d.get(flag) is None:
                d.pop(flag, None)
        # transformers >= 5 nests rope_theta in rope_parameters; older versions use rope_scaling.
        rope_params = d.pop("rope_parameters", None)
        kw: dict[str, Any] = {}
        if isinstance(rope_params, dict):
            rp = dict(rope_params)
            if "rope_theta" in rp:
                kw["rope_theta"] = float(rp.pop("rope_theta"))
            if rp.get("rope_type", rp.get("type", "default")) not in ("default", None):
                kw["rope_scaling"] = rp
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        for k in _KNOWN:
            if k in d and k not in kw:
                kw[k] = d.pop(k)
        if kw.get("rope_scaling") is not None and kw["rope_scaling"].get(
            "rope_type", kw["rope_scaling"].get("type")
        ) in ("default", None):
            kw["rope_scaling"] = None
        if "torch_dtype" in kw and kw["torch_dtype"] is None:
            kw["torch_dtype"] = "float32"
        kw["extra"] = d
        try:
            return cls(**kw)
        except TypeError as e:  # pragma: no cover - defensive
            raise BuildError(f"invalid model config: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        for k in _KNOWN:
            d[k] = getattr(self, k)
        if d["head_dim"] is None:
            d["head_dim"] = self.head_dim_
        d["architectures"] = [self.family.hf_class]
        d["hidden_act"] = "silu"
        d.pop("rope_parameters", None)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise BuildError(
                f"{path}: no such config file",
                hint="pass a preset name (tiny, small) or a config.json of a supported family (docs/models.md)",
            ) from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BuildError(
                f"{path}: not a readable JSON config ({e})", hint="fix the JSON or pass a preset name (tiny, small)"
            ) from e
        if not isinstance(d, dict):
            raise BuildError(f"{path}: config must be a JSON object", hint="see docs/build.md for the fields")
        family_of(d, str(path))
        try:
            return cls.from_dict(d)
        except BuildError as e:
            raise BuildError(f"{path}: {e.args[0]}", hint=e.hint) from e

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


#: Named presets. Every matmul input dimension (hidden, intermediate) is a multiple of 256 so
#: llama.cpp's K-quants apply without fallback.
PRESETS: dict[str, dict[str, Any]] = {
    # ~1.8M parameters: trains to readable output on the default corpus in about a minute on 1 core.
    "tiny": dict(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    # ~30M parameters: a real small model (hours on a CPU, minutes on a GPU).
    "small": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}


def resolve_config(spec: str | Path | ModelConfig | dict, **overrides: Any) -> ModelConfig:
    """A config from a preset name, a JSON file, a dict or a ModelConfig; ``overrides`` win."""
    if isinstance(spec, ModelConfig):
        cfg = spec
    elif isinstance(spec, dict):
        cfg = ModelConfig.from_dict(spec)
    elif isinstance(spec, str) and spec in PRESETS:
        cfg = ModelConfig(**PRESETS[spec])
    else:
        p = Path(spec)
        if not p.exists():
            raise BuildError(
                f"unknown config {str(spec)!r}: not a preset nor a file",
                hint=f"use one of {sorted(PRESETS)} or a JSON file path",
            )
        cfg = ModelConfig.from_file(p / "config.json" if p.is_dir() else p)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return cfg.replace(**overrides) if overrides else cfg

"""Local LoRA fine-tuning and the adapter directory it writes.

    report = finetune(model_dir, ["notes.txt"], "adapters/kitchen", LoraConfig(rank=8), steps=100)
    adapter = load_adapter("adapters/kitchen")           # Adapter(config, state, base_sha256, ...)
    merge_adapter(model_dir, "adapters/kitchen", "merged/")  # a full model directory

The trainer is the federated client's (:func:`edgellm.pipeline.lora.train_lora`); only where the
base comes from differs (a model directory here, the device's GGUF there). An adapter directory::

    adapter.safetensors     the adapter tensors, keyed as edgellm.pipeline.lora (no pickle)
    adapter_config.json     rank, alpha, targets, the base model (name, sha256 of its directory
                            files) and the training report

The base's hash is what a build checks: an adapter is only ever bundled on the model it was
trained on.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgellm.errors import BuildError

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "edgellm-lora"


@dataclasses.dataclass
class Adapter:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    state: dict[str, Any]  # torch tensors
    base_sha256: str  # hash_model_dir of the base model directory
    base_name: str
    report: dict[str, Any]

    @property
    def config(self) -> Any:
        from edgellm.pipeline.lora import LoraConfig

        return LoraConfig(rank=self.rank, alpha=self.alpha, targets=self.targets)


def _hint(path: Path) -> str:
    return f"{path} is not an adapter directory written by `edgellm finetune`: run it again"


def load_adapter(adapter_dir: str | Path) -> Adapter:
    """Read and check an adapter directory (keys, shapes and finite values checked by the caller's model)."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    try:
        meta = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
        state = load_file(str(d / ADAPTER_FILE))
    except (OSError, ValueError) as e:
        raise BuildError(f"{d}: unreadable adapter ({e})", hint=_hint(d)) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("base"), dict):
        raise BuildError(f"{d / CONFIG_FILE}: not an {FORMAT} adapter config", hint=_hint(d))
    try:
        ad = Adapter(
            rank=int(meta["rank"]),
            alpha=float(meta["alpha"]),
            targets=tuple(meta["targets"]),
            state=state,
            base_sha256=str(meta["base"]["model_sha256"]),
            base_name=str(meta["base"].get("name") or ""),
            report=dict(meta.get("report") or {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BuildError(f"{d / CONFIG_FILE}: missing or invalid field ({e})", hint=_hint(d)) from e
    ad.config  # noqa: B018 - reading the property validates rank, alpha and targets
    return ad


def save_adapter(
    out: str | Path,
    state: dict[str, Any],
    cfg: Any,
    *,
    base_sha256: str,
    base_name: str,
    report: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Atomically write an adapter directory."""
    from safetensors.torch import save_file

    from edgellm.pipeline._atomic import atomic_dir

    meta = {
        "format": FORMAT,
        "rank": cfg.rank,
        "alpha": float(cfg.alpha),
        "targets": list(cfg.targets),
        "base": {"model_sha256": base_sha256, "name": base_name},
        "report": report,
    }
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(out)


def base_model_with_adapter(model_dir: str | Path, adapter: Adapter) -> Any:
    """The base model (torch) with ``adapter`` applied; refuses an adapter trained on another base."""
    from edgellm.pipeline.candidate_cache import hash_model_dir
    from edgellm.pipeline.lora import apply_lora, load_lora_state
    from edgellm.pipeline.model import load_model

    sha = hash_model_dir(model_dir)
    if sha != adapter.base_sha256:
        raise BuildError(
            f"the adapter was trained on base {adapter.base_sha256[:12]}…, not on {model_dir} ({sha[:12]}…)",
            hint="pass the --model the adapter was fine-tuned from",
        )
    model = load_model(model_dir)
    apply_lora(model, adapter.config)
    load_lora_state(model, adapter.state)
    return model


def finetune(
    model_dir: str | Path,
    data: Sequence[str | Path],
    out: str | Path,
    cfg: Any,
    *,
    steps: int,
    lr: float,
    batch_size: int = 4,
    seq_len: int = 64,
    seed: int = 0,
    threads: int = 1,
    val_fraction: float = 0.05,
    max_seconds: float | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a LoRA adapter on ``data`` over the frozen model in ``model_dir``; write it to ``out``."""
    from edgellm.pipeline import tokenizer as tk
    from edgellm.pipeline._atomic import check_output_path
    from edgellm.pipeline.candidate_cache import hash_model_dir
    from edgellm.pipeline.data import load_dataset
    from edgellm.pipeline.lora import heldout_loss, lora_state, train_lora
    from edgellm.pipeline.model import load_model

    out, model_dir = Path(out), Path(model_dir)
    check_output_path(out, overwrite)
    ds = load_dataset(list(data), val_fraction=val_fraction)
    model = load_model(model_dir)
    tok = tk.load_tokenizer(model_dir)
    heldout = ds.val or ds.train
    base_loss = heldout_loss(model, tok, heldout, seq_len=seq_len)
    summary = train_lora(
        model,
        tok,
        ds.train,
        cfg,
        steps,
        lr,
        heldout=heldout,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        max_seconds=max_seconds,
        threads=threads,
    )
    report = {
        "kind": "finetune",
        "out": str(out),
        "model": str(model_dir),
        "rank": cfg.rank,
        "alpha": float(cfg.alpha),
        "targets": list(cfg.targets),
        "data": ds.lineage(),
        "base_val_loss": base_loss,
        "base_val_ppl": math.exp(min(base_loss, 50.0)),
        **{k: v for k, v in summary.items() if k != "history"},
    }
    if isinstance(report.get("val_loss"), float):
        report["val_ppl"] = math.exp(min(report["val_loss"], 50.0))
    save_adapter(
        out,
        lora_state(model),
        cfg,
        base_sha256=hash_model_dir(model_dir),
        base_name=model_dir.resolve().name,
        report=report,
        overwrite=overwrite,
    )
    return report


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a full model directory: the base with the adapter folded in (W += B A alpha / r)."""
    from edgellm.pipeline.lora import merge_lora
    from edgellm.pipeline.model import save_model_dir

    model = base_model_with_adapter(model_dir, load_adapter(adapter_dir))
    merge_lora(model)
    # the tokenizer, and the train report that names the data the build evaluates on
    carried = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "train_report.json")
    extra = {n: (Path(model_dir) / n).read_text(encoding="utf-8") for n in carried if (Path(model_dir) / n).is_file()}
    return save_model_dir(model, out, extra_files=extra, overwrite=overwrite)

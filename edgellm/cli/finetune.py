"""`edgellm finetune` — local LoRA fine-tuning (the federated client's trainer) into an adapter directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgellm.cli._common import echo_json


@click.command("finetune")
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="HF-format base model directory (kept frozen).",
)
@click.option(
    "--data",
    "data",
    required=True,
    multiple=True,
    help="Text file, JSONL (text field), directory, or builtin:devices. Repeatable.",
)
@click.option("--lora-rank", type=int, default=8, show_default=True, help="Adapter rank (1..256).")
@click.option("--lora-alpha", type=float, default=None, help="Adapter alpha (default: twice the rank).")
@click.option(
    "--lora-targets",
    default=None,
    help="Comma-separated projections (default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Adapter directory to write.")
@click.option("--steps", type=int, default=100, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per training window.")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads.")
@click.option("--val-fraction", type=float, default=0.05, show_default=True)
@click.option("--max-seconds", type=float, default=None, help="Stop cleanly after this much time.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (atomically).")
def finetune_cmd(
    model_dir: Path,
    data: tuple[str, ...],
    lora_rank: int,
    lora_alpha: float | None,
    lora_targets: str | None,
    out: Path,
    **kw: Any,
) -> None:
    """Fine-tune a LoRA adapter on MODEL with local DATA; the base stays untouched.

    Writes OUT (adapter.safetensors + adapter_config.json naming the base by its hash) and prints
    the JSON report: validation loss before and after, steps, trainable parameters. Ship it with
    `edgellm build --model MODEL --adapter OUT --profile P`.
    """
    from edgellm.pipeline.finetune import finetune
    from edgellm.pipeline.lora import ATTN_TARGETS, MLP_TARGETS, LoraConfig

    targets = (
        tuple(t.strip() for t in lora_targets.split(",") if t.strip()) if lora_targets else ATTN_TARGETS + MLP_TARGETS
    )
    cfg = LoraConfig(rank=lora_rank, alpha=lora_alpha if lora_alpha is not None else 2.0 * lora_rank, targets=targets)
    report = finetune(model_dir, list(data), out, cfg, **kw)
    click.echo(
        f"wrote {out}: rank {cfg.rank}, {report['trainable_params']:,} trainable params, "
        f"val ppl {report['base_val_ppl']:.3f} -> {report.get('val_ppl', float('nan')):.3f}",
        err=True,
    )
    echo_json(report)


commands: list = [finetune_cmd]

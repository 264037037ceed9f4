"""Knowledge distillation: a smaller student learns from a teacher's temperature-softened
distribution (KL) plus the data (cross-entropy).

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, data)

The student shares the teacher's tokenizer, chat template and family (its vocabulary, special ids
and ``model_type`` are taken from the teacher). The report gives teacher vs student parameters, validation perplexity of both, and
the student's top-1 agreement with the teacher on the validation split.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgellm.errors import BuildError
from edgellm.pipeline import tokenizer as tk
from edgellm.pipeline._atomic import atomic_dir, check_output_path
from edgellm.pipeline.config import ModelConfig, resolve_config
from edgellm.pipeline.data import load_dataset
from edgellm.pipeline.model import LlamaLM, load_model
from edgellm.pipeline.train import (
    TrainConfig,
    data_streams,
    default_ckpt_dir,
    lm_loss,
    param_count,
    run_loop,
    sample_reply,
    val_loss,
    write_model_and_tokenizer,
)


def kd_loss_fn(teacher: LlamaLM, temperature: float, alpha: float):
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(student: LlamaLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s_logits, _ = student(x)
        with torch.no_grad():
            t_logits, _ = teacher(x)
        V = s_logits.shape[-1]
        ce = F.cross_entropy(s_logits.reshape(-1, V), y.reshape(-1))
        kl = (
            F.kl_div(
                F.log_softmax(s_logits.reshape(-1, V) / temperature, -1),
                F.log_softmax(t_logits.reshape(-1, V) / temperature, -1),
                reduction="batchmean",
                log_target=True,
            )
            * temperature**2
        )
        return alpha * kl + (1 - alpha) * ce

    return loss


@torch.no_grad()
def top1_agreement(a: LlamaLM, b: LlamaLM, windows: np.ndarray, batch_size: int = 16) -> float:
    same = total = 0
    for i in range(0, len(windows), batch_size):
        x = torch.from_numpy(windows[i : i + batch_size, :-1])
        la, _ = a(x)
        lb, _ = b(x)
        same += int((la.argmax(-1) == lb.argmax(-1)).sum())
        total += x.numel()
    return same / max(1, total)


def student_config(spec: str | Path | ModelConfig | dict, teacher: ModelConfig) -> ModelConfig:
    cfg = resolve_config(spec)
    return cfg.replace(
        model_type=teacher.model_type,
        vocab_size=teacher.vocab_size,
        bos_token_id=teacher.bos_token_id,
        eos_token_id=teacher.eos_token_id,
        pad_token_id=teacher.pad_token_id,
        max_position_embeddings=min(cfg.max_position_embeddings, teacher.max_position_embeddings),
    )


def distill_model(
    teacher_dir: str | Path,
    data: Any,
    student: str | Path | ModelConfig | dict,
    out: str | Path,
    tcfg: TrainConfig | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.9,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Distill ``teacher_dir`` into a new student model directory ``out``; returns the report."""
    tcfg = tcfg or TrainConfig()
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise BuildError(
            f"temperature {temperature} / alpha {alpha} out of range",
            hint="use temperature > 0 and alpha within [0, 1]",
        )
    out = Path(out)
    check_output_path(out, overwrite)
    torch.manual_seed(tcfg.seed)
    teacher = load_model(teacher_dir)
    tok = tk.load_tokenizer(teacher_dir)
    ds = load_dataset(data, val_fraction=tcfg.val_fraction)
    scfg = student_config(student, teacher.config)
    if tcfg.seq_len > scfg.max_position_embeddings:
        tcfg = dataclasses.replace(tcfg, seq_len=scfg.max_position_embeddings)
    model = LlamaLM(scfg)
    train_stream, val_w = data_streams(tok, ds, scfg, tcfg)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else default_ckpt_dir(out)
    fingerprint = json.loads(
        json.dumps(
            {
                "data_sha256": ds.sha256,
                "config": scfg.to_dict(),
                "teacher": str(teacher_dir),
                "temperature": temperature,
                "alpha": alpha,
                "train": {k: v for k, v in tcfg.to_dict().items() if k not in ("progress", "threads", "max_seconds")},
            }
        )
    )
    loss_fn = kd_loss_fn(teacher, temperature, alpha) if alpha > 0 else lm_loss
    summary = run_loop(
        model,
        tok,
        train_stream,
        val_w,
        tcfg,
        loss_fn=loss_fn,
        ckpt_dir=ckpt,
        resume=resume,
        fingerprint=fingerprint,
        label="distill",
        tok_src=Path(teacher_dir),
    )
    t_loss = val_loss(teacher, val_w)
    report = {
        "kind": "distill",
        "out": str(out),
        "teacher": str(teacher_dir),
        "teacher_params": param_count(teacher),
        "student_params": param_count(model),
        "param_ratio": param_count(model) / param_count(teacher),
        "teacher_val_ppl": math.exp(t_loss),
        "student_val_ppl": summary["val_ppl"],
        "top1_agreement": top1_agreement(model, teacher, val_w),
        "temperature": temperature,
        "alpha": alpha,
        "config": scfg.to_dict(),
        "train_config": tcfg.to_dict(),
        "data": ds.lineage(),
        "sample": {"prompt": "turn on the kitchen light", "reply": _safe_sample(model, tok, Path(teacher_dir))},
        **summary,
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_model_and_tokenizer(model, tok, tmp, Path(teacher_dir))
        (tmp / "distill_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if ckpt.exists() and not tcfg.keep_checkpoints:
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)
    return report


def _safe_sample(model: LlamaLM, tok: Any, teacher_dir: Path) -> str | None:
    try:
        return sample_reply(model, tok, model_dir=teacher_dir)
    except Exception:  # noqa: BLE001 - a foreign tokenizer without our role tokens
        return None

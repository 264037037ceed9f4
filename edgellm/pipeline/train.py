"""Training: AdamW, warmup + cosine, gradient clipping, validation perplexity, checkpoints
(safetensors only, never pickle), exact resume, fixed seeds, progress on stderr (:mod:`edgellm.pipeline.progress`), a JSON report.

Public API::

    report = train_model("builtin:devices", "tiny", "out/model", TrainConfig(steps=300))
    report = train_model("data.jsonl", None, "out/ft", TrainConfig(steps=100), from_dir="out/model")

The output model directory is written atomically (temp dir + rename). Checkpoints live in
``<out>.ckpt/`` (overridable) so an interrupted run can ``resume=True``; they are removed
after a successful run unless ``keep_checkpoints``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgellm.errors import BuildError
from edgellm.pipeline import tokenizer as tk
from edgellm.pipeline._atomic import atomic_dir, check_output_path
from edgellm.pipeline.config import ModelConfig, resolve_config
from edgellm.pipeline.data import DataSet, eval_windows, load_dataset, token_stream
from edgellm.pipeline.model import LlamaLM, copy_tokenizer_files, generate_ids, load_model, write_model_files
from edgellm.pipeline.progress import progress_reporter

log = logging.getLogger(__name__)

SAMPLE_PROMPT = [{"role": "user", "content": "turn on the kitchen light"}]


@dataclasses.dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 16
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    keep_checkpoints: bool = False
    seed: int = 0
    threads: int = 1
    val_fraction: float = 0.05
    max_seconds: float | None = None  # stop early (cleanly) after this much wall time
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        lo = self.lr * self.min_lr_ratio
        return lo + (self.lr - lo) * 0.5 * (1 + math.cos(math.pi * t))


LossFn = Callable[[LlamaLM, torch.Tensor, torch.Tensor], torch.Tensor]


def lm_loss(model: LlamaLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits, _ = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def val_loss(model: LlamaLM, windows: np.ndarray, batch_size: int = 16) -> float:
    """Mean next-token NLL (nats) over ``windows`` ``[n, seq+1]``."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = torch.from_numpy(windows[i : i + batch_size])
        logits, _ = model(w[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    model.train(was)
    return total / max(1, count)


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _make_optimizer(model: LlamaLM, tcfg: TrainConfig) -> torch.optim.AdamW:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _name, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


# ---- checkpoints (safetensors + JSON) -------------------------------------------------------
def write_model_and_tokenizer(model: LlamaLM, tok: Any, dst: Path, tok_src: Path | None = None) -> None:
    """Model files plus tokenizer files: copied from ``tok_src`` (a user's checkpoint keeps its
    own tokenizer and chat template) or written from ``tok``."""
    if tok_src is not None:
        write_model_files(model, dst)
        copy_tokenizer_files(Path(tok_src), dst)
    else:
        write_model_files(model, dst, tokenizer=tok)


def _save_checkpoint(
    ckpt_dir: Path,
    model: LlamaLM,
    tok: Any,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    state: dict[str, Any],
    tok_src: Path | None = None,
) -> None:
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {"__rng__": gen.get_state().clone()}
    for p, st in opt.state.items():
        n = names[id(p)]
        for k in ("exp_avg", "exp_avg_sq"):
            tensors[f"{n}.{k}"] = st[k].detach().contiguous().clone()
        tensors[f"{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).clone()
    with atomic_dir(ckpt_dir, overwrite=True) as tmp:
        write_model_and_tokenizer(model, tok, tmp, tok_src)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _load_checkpoint(
    ckpt_dir: Path, model: LlamaLM, opt: torch.optim.Optimizer, gen: torch.Generator
) -> dict[str, Any]:
    from edgellm.pipeline.model import _read_safetensors

    state = json.loads((ckpt_dir / "state.json").read_text(encoding="utf-8"))
    loaded = load_model(ckpt_dir)
    model.load_state_dict(loaded.state_dict())
    tensors = _read_safetensors(ckpt_dir / "optimizer.safetensors")
    gen.set_state(tensors.pop("__rng__"))
    for n, p in model.named_parameters():
        if f"{n}.exp_avg" in tensors:
            opt.state[p] = {
                "exp_avg": tensors[f"{n}.exp_avg"],
                "exp_avg_sq": tensors[f"{n}.exp_avg_sq"],
                "step": tensors[f"{n}.step"].reshape(()),
            }
    return state


# ---- the loop shared by train and distill ----------------------------------------------------
def run_loop(
    model: LlamaLM,
    tok: Any,
    train_stream: np.ndarray,
    val_windows: np.ndarray,
    tcfg: TrainConfig,
    *,
    loss_fn: LossFn = lm_loss,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    fingerprint: dict[str, Any] | None = None,
    label: str = "train",
    tok_src: Path | None = None,
) -> dict[str, Any]:
    """Optimise ``model`` in place; returns the run summary (history, losses, speed)."""
    torch.set_num_threads(max(1, tcfg.threads))
    if len(train_stream) < tcfg.seq_len + 2:
        raise BuildError(
            f"training text too short ({len(train_stream)} tokens) for seq_len {tcfg.seq_len}",
            hint="add more data or lower --seq-len",
        )
    model.train()
    opt = _make_optimizer(model, tcfg)
    gen = torch.Generator().manual_seed(tcfg.seed)
    start_step, history = 0, []
    fingerprint = fingerprint or {}
    if resume and ckpt_dir is not None and (ckpt_dir / "state.json").exists():
        st = _load_checkpoint(ckpt_dir, model, opt, gen)
        if st.get("fingerprint") != fingerprint:
            raise BuildError(
                f"{ckpt_dir}: checkpoint was made with other data/config/settings",
                hint="resume with the same --data/--config/settings, or delete the checkpoint directory",
            )
        start_step, history = int(st["step"]), list(st.get("history", []))
        log.info("resumed from %s at step %d", ckpt_dir, start_step)
    stream = torch.from_numpy(train_stream)
    n_start = len(train_stream) - tcfg.seq_len - 1
    t0 = time.perf_counter()
    tokens = 0
    last_loss = float("nan")
    vloss = float("nan")
    with progress_reporter(label, tcfg.steps, enabled=tcfg.progress) as bar:
        bar.update(start_step)
        done = start_step
        for step in range(start_step, tcfg.steps):
            lr = tcfg.lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.randint(0, n_start + 1, (tcfg.batch_size,), generator=gen)
            batch = torch.stack([stream[i : i + tcfg.seq_len + 1] for i in idx.tolist()])
            x, y = batch[:, :-1], batch[:, 1:]
            loss = loss_fn(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            opt.step()
            last_loss = float(loss.detach())
            if not math.isfinite(last_loss):
                raise BuildError(
                    f"training diverged at step {step + 1} (loss {last_loss})",
                    hint="lower --lr or raise --warmup-steps",
                )
            tokens += x.numel()
            elapsed = time.perf_counter() - t0
            done = step + 1
            is_last = done == tcfg.steps or (tcfg.max_seconds is not None and elapsed >= tcfg.max_seconds)
            rec: dict[str, Any] = {"step": done, "train_loss": round(last_loss, 5), "lr": lr}
            if (tcfg.eval_every and done % tcfg.eval_every == 0) or is_last:
                vloss = val_loss(model, val_windows)
                rec["val_loss"], rec["val_ppl"] = round(vloss, 5), round(math.exp(vloss), 4)
            if "val_loss" in rec or done % 10 == 0:
                rec["elapsed_s"] = round(elapsed, 2)
                history.append(rec)
            bar.update(
                done,
                detail=f"loss {last_loss:.3f}  val ppl {math.exp(vloss) if math.isfinite(vloss) else float('nan'):.2f}  "
                f"{tokens / max(elapsed, 1e-9):.0f} tok/s",
            )
            if ckpt_dir is not None and tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0 and not is_last:
                _save_checkpoint(
                    ckpt_dir,
                    model,
                    tok,
                    opt,
                    gen,
                    {"step": done, "history": history, "fingerprint": fingerprint},
                    tok_src,
                )
            if is_last:
                break
    model.eval()
    seconds = time.perf_counter() - t0
    if not math.isfinite(vloss):
        vloss = val_loss(model, val_windows)
    return {
        "steps": done,
        "resumed_from_step": start_step,
        "final_train_loss": last_loss,
        "val_loss": vloss,
        "val_ppl": math.exp(vloss),
        "tokens_trained": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        "history": history,
    }


def sample_reply(
    model: LlamaLM,
    tok: Any,
    messages: list[dict] = SAMPLE_PROMPT,
    max_new_tokens: int = 24,
    model_dir: Path | None = None,
) -> str:
    """Greedy reply to a chat prompt (shows what the model learned), prompted with the chat
    template of ``model_dir`` (the checkpoint the tokenizer came from) when it has one."""
    if model_dir is not None and tk.chat_template_of(model_dir) not in (None, tk.CHAT_TEMPLATE):
        ids = tk.chat_prompt_ids(tok, messages, model_dir)
    else:
        ids = [model.config.bos_token_id] if model.config.bos_token_id is not None else []
        ids += tk.encode_chat(tok, messages)
    out = generate_ids(model, ids, max_new_tokens, eos_ids=model.config.eos_token_ids)
    return tok.decode(out)


def data_streams(tok: Any, ds: DataSet, cfg: ModelConfig, tcfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    train = token_stream(
        tok, ds.train, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    )
    val = token_stream(tok, ds.val, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_ids[0] if cfg.eos_token_ids else None)
    seq = min(tcfg.seq_len, cfg.max_position_embeddings)
    return train, eval_windows(val, seq, tcfg.eval_windows)


def default_ckpt_dir(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt")


def train_model(
    data: Any,
    config: str | Path | ModelConfig | dict | None,
    out: str | Path,
    tcfg: TrainConfig | None = None,
    *,
    from_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train (or fine-tune ``from_dir``) a model on ``data`` and write a model directory at ``out``.

    ``config``: preset name (``tiny``, ``small``), JSON file, dict or ModelConfig; ignored with
    ``from_dir``. Returns the report also written to ``out/train_report.json``.
    """
    tcfg = tcfg or TrainConfig()
    out = Path(out)
    check_output_path(out, overwrite)
    torch.manual_seed(tcfg.seed)
    ds = load_dataset(data, val_fraction=tcfg.val_fraction)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else default_ckpt_dir(out)
    if from_dir is not None:
        model = load_model(from_dir)
        tok = tk.load_tokenizer(from_dir)
        cfg = model.config
    elif resume and (ckpt / "state.json").exists():  # the checkpoint's own tokenizer and config
        tok = tk.load_tokenizer(ckpt)
        model = load_model(ckpt)
        cfg = model.config
    else:
        if config is None:
            raise BuildError("no model config given", hint="pass --config tiny|small|FILE or --from MODEL_DIR")
        cfg = resolve_config(config)
        tok = tk.train_tokenizer(ds.train, cfg.vocab_size)
        cfg = cfg.replace(
            vocab_size=tok.get_vocab_size(),
            bos_token_id=tok.token_to_id(tk.BOS),
            eos_token_id=tok.token_to_id(tk.EOS),
            pad_token_id=tok.token_to_id(tk.PAD),
        )
        model = LlamaLM(cfg)
    if tcfg.seq_len > cfg.max_position_embeddings:
        tcfg = dataclasses.replace(tcfg, seq_len=cfg.max_position_embeddings)
    train_stream, val_w = data_streams(tok, ds, cfg, tcfg)
    fingerprint = {
        "data_sha256": ds.sha256,
        "config": cfg.to_dict(),
        "from": str(from_dir) if from_dir else None,
        "train": {k: v for k, v in tcfg.to_dict().items() if k not in ("progress", "threads", "max_seconds")},
    }
    fingerprint = json.loads(json.dumps(fingerprint))
    summary = run_loop(
        model,
        tok,
        train_stream,
        val_w,
        tcfg,
        ckpt_dir=ckpt,
        resume=resume,
        fingerprint=fingerprint,
        label="train" if from_dir is None else "fine-tune",
        tok_src=Path(from_dir) if from_dir else None,
    )
    report = {
        "kind": "train",
        "out": str(out),
        "from": str(from_dir) if from_dir else None,
        "params": param_count(model),
        "config": cfg.to_dict(),
        "train_config": tcfg.to_dict(),
        "data": ds.lineage(),
        "sample": {
            "prompt": SAMPLE_PROMPT,
            "reply": sample_reply(model, tok, model_dir=Path(from_dir) if from_dir else None),
        },
        **summary,
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_model_and_tokenizer(model, tok, tmp, Path(from_dir) if from_dir else None)
        (tmp / "train_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if ckpt.exists() and not tcfg.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    return report

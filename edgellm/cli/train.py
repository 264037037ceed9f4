"""`edgellm train|distill|export|eval` commands.

Each command calls the same Python API users call (``edgellm.pipeline.*``), prints its JSON report
on stdout and shows progress on stderr. torch is imported inside the commands only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgellm.cli._common import echo_json


def _train_options(f):
    opts = [
        click.option("--steps", type=int, default=300, show_default=True, help="Optimizer steps."),
        click.option("--batch-size", type=int, default=16, show_default=True),
        click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per training window."),
        click.option("--lr", type=float, default=3e-3, show_default=True, help="Peak learning rate (AdamW)."),
        click.option("--warmup-steps", type=int, default=20, show_default=True),
        click.option("--weight-decay", type=float, default=0.1, show_default=True),
        click.option("--grad-clip", type=float, default=1.0, show_default=True),
        click.option(
            "--eval-every", type=int, default=100, show_default=True, help="Validation perplexity every N steps."
        ),
        click.option(
            "--checkpoint-every",
            type=int,
            default=0,
            show_default=True,
            help="Write a resumable checkpoint every N steps (0: never).",
        ),
        click.option(
            "--checkpoint-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Checkpoint directory (default: OUT.ckpt next to --out).",
        ),
        click.option("--resume", is_flag=True, help="Continue from the checkpoint directory if it has one."),
        click.option("--keep-checkpoints", is_flag=True, help="Keep the checkpoint directory after success."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--threads", type=int, default=1, show_default=True, help="torch threads."),
        click.option("--val-fraction", type=float, default=0.05, show_default=True),
        click.option("--max-seconds", type=float, default=None, help="Stop cleanly after this much time."),
        click.option("--overwrite", is_flag=True, help="Replace --out if it exists (atomically)."),
        click.option("--quiet", is_flag=True, help="No progress output on stderr."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _tcfg(kw: dict[str, Any]):
    from edgellm.pipeline.train import TrainConfig

    return TrainConfig(
        steps=kw["steps"],
        batch_size=kw["batch_size"],
        seq_len=kw["seq_len"],
        lr=kw["lr"],
        warmup_steps=kw["warmup_steps"],
        weight_decay=kw["weight_decay"],
        grad_clip=kw["grad_clip"],
        eval_every=kw["eval_every"],
        checkpoint_every=kw["checkpoint_every"],
        keep_checkpoints=kw["keep_checkpoints"],
        seed=kw["seed"],
        threads=kw["threads"],
        val_fraction=kw["val_fraction"],
        max_seconds=kw["max_seconds"],
        progress=not kw["quiet"],
    )


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the long per-step history (it stays in the file)."""
    return {k: v for k, v in report.items() if k != "history"}


@click.command("train")
@click.option(
    "--data",
    "data",
    required=True,
    multiple=True,
    help="Text file, JSONL (text field), directory, or builtin:devices (the embedded corpus). Repeatable.",
)
@click.option(
    "--config",
    "config",
    default=None,
    help="Model config: a preset (tiny, small) or a JSON file with LlamaForCausalLM fields.",
)
@click.option(
    "--from",
    "from_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Fine-tune this HF-format model directory instead of starting fresh.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Model directory to write.")
@_train_options
def train_cmd(data: tuple[str, ...], config: str | None, from_dir: Path | None, out: Path, **kw: Any) -> None:
    """Train a Llama-style model (or fine-tune one with --from) and write an HF model directory.

    Prints the final JSON report (also written to OUT/train_report.json).
    """
    from edgellm.pipeline.train import train_model

    if config is None and from_dir is None:
        raise click.UsageError("pass --config tiny|small|FILE, or --from MODEL_DIR to fine-tune")
    report = train_model(
        list(data),
        config,
        out,
        _tcfg(kw),
        from_dir=from_dir,
        checkpoint_dir=kw["checkpoint_dir"],
        resume=kw["resume"],
        overwrite=kw["overwrite"],
    )
    click.echo(
        f"wrote {out}: {report['params']:,} params, val ppl {report['val_ppl']:.3f}, "
        f"{report['tokens_per_second']:.0f} tok/s; sample reply: {report['sample']['reply']!r}",
        err=True,
    )
    echo_json(_summary(report))


@click.command("distill")
@click.option(
    "--teacher",
    "teacher",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Teacher model directory.",
)
@click.option("--data", "data", required=True, multiple=True, help="Training data (as for `train`).")
@click.option("--student-config", "student", required=True, help="Student config: preset name or JSON file.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Student model directory to write.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Softening temperature of the KL term.")
@click.option("--alpha", type=float, default=0.9, show_default=True, help="Weight of KL vs cross-entropy.")
@_train_options
def distill_cmd(
    teacher: Path, data: tuple[str, ...], student: str, out: Path, temperature: float, alpha: float, **kw: Any
) -> None:
    """Distill TEACHER into a smaller student (KL to the teacher + cross-entropy).

    Reports teacher vs student parameters, validation perplexity and top-1 agreement.
    """
    from edgellm.pipeline.distill import distill_model

    report = distill_model(
        teacher,
        list(data),
        student,
        out,
        _tcfg(kw),
        temperature=temperature,
        alpha=alpha,
        checkpoint_dir=kw["checkpoint_dir"],
        resume=kw["resume"],
        overwrite=kw["overwrite"],
    )
    click.echo(
        f"wrote {out}: student {report['student_params']:,} params ({report['param_ratio']:.1%} of teacher), "
        f"val ppl {report['student_val_ppl']:.3f} (teacher {report['teacher_val_ppl']:.3f}), "
        f"top-1 agreement {report['top1_agreement']:.1%}",
        err=True,
    )
    echo_json(_summary(report))


# ---- export: one dispatch table; gguf-* goes to build pipeline II ------------------------------
ExportFn = Callable[..., dict]


def _export_onnx(model_dir: Path, out: Path, fmt: str, *, evaluate: bool, data: Any, overwrite: bool) -> dict:
    from edgellm.pipeline.export.onnx import export_onnx

    return export_onnx(
        model_dir,
        out,
        fmt="onnx" if fmt == "onnx-fp32" else fmt,
        evaluate=evaluate,
        eval_data=data,
        overwrite=overwrite,
    )


def _export_gguf(model_dir: Path, out: Path, fmt: str, *, evaluate: bool, data: Any, overwrite: bool) -> dict:
    from edgellm._fs import atomic_write
    from edgellm.pipeline._atomic import check_output_path
    from edgellm.pipeline.export.gguf import export_gguf
    from edgellm.pipeline.export.onnx import report_path

    check_output_path(out, overwrite)
    report = dict(export_gguf(model_dir, out, fmt))
    report.setdefault("kind", "export")
    report.setdefault("format", fmt)
    if evaluate:
        from edgellm.pipeline.evaluate import evaluate_artifact

        report["eval"] = evaluate_artifact(out, model_dir=model_dir, data=data)
    atomic_write(report_path(out), (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))
    return report


#: format -> exporter. ``gguf-*`` formats are looked up in edgellm.pipeline.export.gguf.FORMATS at call time.
EXPORTERS: dict[str, ExportFn] = {"onnx": _export_onnx, "onnx-fp32": _export_onnx, "onnx-int8": _export_onnx}


def exporter_for(fmt: str) -> ExportFn:
    if fmt in EXPORTERS:
        return EXPORTERS[fmt]
    if fmt.startswith("gguf-"):
        return _export_gguf
    raise click.BadParameter(
        f"unknown format {fmt!r}: use onnx, onnx-int8 or gguf-<type> (e.g. gguf-q4_k_m)", param_hint="--format"
    )


@click.command("export")
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="HF-format model directory.",
)
@click.option(
    "--format", "fmt", required=True, help="onnx | onnx-int8 | gguf-f32 | gguf-f16 | gguf-q8_0 | gguf-q4_k_m | ... "
)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Artifact file to write.")
@click.option(
    "--data", "data", multiple=True, help="Evaluation data (default: the model's training data, validation split)."
)
@click.option("--no-eval", is_flag=True, help="Skip the evaluation report (size only).")
@click.option("--overwrite/--no-overwrite", default=True, show_default=True)
def export_cmd(model_dir: Path, fmt: str, out: Path, data: tuple[str, ...], no_eval: bool, overwrite: bool) -> None:
    """Export MODEL to an ONNX (KV cache; fp32 or int8) or GGUF artifact.

    Writes OUT atomically plus OUT.report.json (size, perplexity, bits/byte, KL and top-1
    agreement vs the fp32 model, decode tokens/s here) and prints that report.
    """
    from edgellm.pipeline.progress import progress_reporter

    fn = exporter_for(fmt)
    with progress_reporter("export", 1) as bar:
        bar.update(0, step=f"exporting {fmt}" + ("" if no_eval else " and evaluating"))
        report = fn(model_dir, out, fmt, evaluate=not no_eval, data=list(data) or None, overwrite=overwrite)
        bar.update(1, step="done")
    ev = report.get("eval") or {}
    if (ev.get("data") or {}).get("note"):
        click.echo(f"note: {ev['data']['note']}", err=True)
    msg = f"wrote {out} ({report.get('size_bytes', out.stat().st_size) / 2**20:.2f} MiB)"
    if ev:
        msg += (
            f": ppl {ev['perplexity']:.3f} (fp32 {ev.get('reference_perplexity', float('nan')):.3f}), "
            f"KL {ev.get('kl_divergence', 0):.2e}, top-1 {ev.get('top1_agreement', 1):.1%}, "
            f"{ev['decode_tokens_per_second']:.0f} tok/s"
        )
    click.echo(msg, err=True)
    echo_json(report)


@click.command("eval")
@click.option(
    "--model",
    "artifact",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="Model directory, .onnx or .gguf file.",
)
@click.option(
    "--reference",
    "reference",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="fp32 model directory to compare with (default: --model itself if it is a directory).",
)
@click.option(
    "--data",
    "data",
    multiple=True,
    help="Evaluation data (default: the data the reference was trained on, from its train report; "
    "required for models edgellm did not train).",
)
@click.option("--max-windows", type=int, default=16, show_default=True, help="Validation windows to score.")
@click.option("--seq-len", type=int, default=128, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
def eval_cmd(
    artifact: Path, reference: Path | None, data: tuple[str, ...], max_windows: int, seq_len: int, threads: int
) -> None:
    """Perplexity, bits per byte, KL and top-1 agreement vs the fp32 reference, size, tokens/s.

    Without --data, scores on the validation split of the data the model was trained on; a model
    edgellm did not train (no train report) needs --data.
    """
    from edgellm.errors import BuildError
    from edgellm.pipeline.evaluate import evaluate_artifact, training_data

    model_dir = reference if reference is not None else (artifact if artifact.is_dir() else None)
    if not data and training_data(model_dir) is None:
        raise BuildError(
            f"{model_dir or artifact}: no training data recorded (no train_report.json naming files "
            "that still exist), so there is nothing meaningful to score it on by default",
            hint="pass --data FILE|DIR with text like what the model will see",
        )

    rep = evaluate_artifact(
        artifact,
        model_dir=reference,
        data=list(data) or None,
        max_windows=max_windows,
        seq_len=seq_len,
        threads=threads,
    )
    click.echo(
        f"{artifact}: ppl {rep['perplexity']:.3f}, {rep.get('bits_per_byte', float('nan')):.3f} bits/byte, "
        f"KL {rep.get('kl_divergence', float('nan')):.2e}, top-1 {rep.get('top1_agreement', float('nan')):.1%}, "
        f"{rep['size_bytes'] / 2**20:.2f} MiB, {rep['decode_tokens_per_second']} tok/s",
        err=True,
    )
    echo_json(rep)


commands: list = [train_cmd, distill_cmd, export_cmd, eval_cmd]

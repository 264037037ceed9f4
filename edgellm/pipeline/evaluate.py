"""Evaluate any artifact: perplexity, bits per byte, KL divergence and top-1 agreement against
the fp32 torch reference, size, and decode tokens/s measured here.

Artifacts: a model directory (torch), an ``.onnx`` file (onnxruntime) or a ``.gguf`` file
(llama.cpp, when its backend is installed). Scorers share one tiny interface:
``logits(batch [B, S]) -> [B, S, V]``, so the metrics are computed the same way for all.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import BuildError
from edgellm.formats import GGUF, ONNX

log = logging.getLogger(__name__)

Scorer = Callable[[np.ndarray], np.ndarray]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def compare_logits(
    logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray | None = None, n_bytes: int | None = None
) -> dict[str, float]:
    """Metrics over ``logits`` ``[N, V]`` for ``targets`` ``[N]`` (optionally vs ``ref_logits``)."""
    lp = _log_softmax(logits)
    idx = np.arange(len(targets))
    nll = float(-lp[idx, targets].mean())
    out: dict[str, float] = {"nll": nll, "perplexity": math.exp(nll), "eval_tokens": int(len(targets))}
    if n_bytes:
        out["bits_per_byte"] = nll * len(targets) / math.log(2) / n_bytes
    if ref_logits is not None:
        lr = _log_softmax(ref_logits)
        out["reference_perplexity"] = math.exp(float(-lr[idx, targets].mean()))
        out["kl_divergence"] = max(0.0, float((np.exp(lr) * (lr - lp)).sum(-1).mean()))
        out["top1_agreement"] = float((ref_logits.argmax(-1) == logits.argmax(-1)).mean())
    return out


def torch_scorer(model: Any) -> Scorer:
    import torch

    def score(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(batch, dtype=np.int64)))[0].numpy()

    return score


def score_windows(scorer: Scorer, windows: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Logits for ``windows[:, :-1]`` flattened to ``[N, V]``."""
    parts = [scorer(windows[i : i + batch_size, :-1]) for i in range(0, len(windows), batch_size)]
    out = np.concatenate(parts)
    return out.reshape(-1, out.shape[-1])


def train_report(model_dir: Path) -> dict[str, Any]:
    """The model's ``train_report.json`` (or ``distill_report.json``) as written by edgellm, else {}."""
    for name in ("train_report.json", "distill_report.json"):
        p = model_dir / name
        if p.is_file():
            try:
                d = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {}
            return d if isinstance(d, dict) else {}
    return {}


def training_data(model_dir: Path | None) -> list[str] | None:
    """The data sources recorded in the model's train or distill report, when they are all still
    there; None for a model edgellm did not train (or whose data is gone)."""
    if model_dir is None:
        return None
    try:
        srcs = [s["path"] for s in train_report(model_dir)["data"]["sources"]]
    except (KeyError, TypeError):
        return None
    if srcs and all(isinstance(s, str) and (s.startswith("builtin") or Path(s).exists()) for s in srcs):
        return srcs
    return None


def _default_data(model_dir: Path | None) -> tuple[Any, str | None]:
    """(data, note): the model's own training data (its validation split), else the embedded
    corpus with a note saying so — scores on it say little about a model not trained on it."""
    srcs = training_data(model_dir)
    if srcs is not None:
        return srcs, None
    note = (
        f"scored on the built-in demo corpus: {model_dir or 'the artifact'} records no training data "
        "edgellm can find; pass --data for a meaningful score"
    )
    log.warning("%s", note)
    return "builtin:devices", note


def _kind(path: Path) -> str:
    if path.is_dir():
        return "torch"
    if path.suffix == ".onnx":
        return ONNX
    if path.suffix == ".gguf":
        return GGUF
    raise BuildError(f"{path}: unknown artifact type", hint="pass a model directory, a .onnx or a .gguf file")


def artifact_size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return path.stat().st_size


def torch_decode_speed(model: Any, n_tokens: int = 32, bos: int = 1) -> float:
    import torch

    n_tokens = max(1, min(n_tokens, model.config.max_position_embeddings - 1))
    with torch.no_grad():
        logits, past = model(torch.tensor([[bos]]))
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            nxt = int(logits[0, -1].argmax())
            logits, past = model(torch.tensor([[nxt]]), past)
    return n_tokens / (time.perf_counter() - t0)


def _score_artifact(
    kind: str,
    artifact: Path,
    md: Path | None,
    reference: Any,
    ref_logits: np.ndarray | None,
    windows: np.ndarray,
    *,
    threads: int,
    speed_tokens: int,
    bos: int,
) -> tuple[np.ndarray, float]:
    """Logits of ``windows`` under ``artifact`` and its decode tokens/s here."""
    from edgellm.pipeline.model import load_model

    if kind == "torch":
        model = reference if reference is not None and md == artifact else load_model(artifact)
        if model is reference and ref_logits is not None:
            logits = ref_logits
        else:
            logits = score_windows(torch_scorer(model), windows)
        return logits, torch_decode_speed(model, speed_tokens, bos)
    from edgellm.runtime import load_runtime

    # llama.cpp gets a context that holds a window (at least its 256-token granule); ONNX its own
    ctx = max(256, windows.shape[1]) if kind == GGUF else None
    with load_runtime(kind, artifact, model_dir=md, threads=threads, context_length=ctx) as rt:
        logits = score_windows(rt.batch_logits, windows)
        return logits, max(rt.decode_speed(speed_tokens) for _ in range(2))


def evaluate_artifact(
    artifact: str | Path,
    *,
    model_dir: str | Path | None = None,
    data: Any = None,
    max_windows: int = 8,
    seq_len: int = 128,
    reference: Any = None,
    speed_tokens: int = 32,
    threads: int = 1,
) -> dict[str, Any]:
    """Measure ``artifact``; ``model_dir`` (or ``reference``, a loaded LlamaLM) is the fp32
    reference and supplies the tokenizer. ``data`` defaults to the model's training data."""
    import torch

    from edgellm.pipeline.data import eval_windows, load_dataset, token_stream
    from edgellm.pipeline.model import load_model
    from edgellm.pipeline.tokenizer import load_tokenizer

    artifact = Path(artifact)
    if not artifact.exists():
        raise BuildError(f"{artifact}: no such artifact", hint="check the path")
    kind = _kind(artifact)
    if model_dir is None and kind == "torch":
        model_dir = artifact
    md = Path(model_dir) if model_dir is not None else None
    torch.set_num_threads(max(1, threads))
    if reference is None and md is not None:
        reference = load_model(md)
    if md is not None:
        tok = load_tokenizer(md)
    elif kind == ONNX:
        from edgellm.runtime.onnx import OnnxRuntime

        with OnnxRuntime.load(artifact) as rt:
            tok = rt.tokenizer
    else:
        raise BuildError(f"{artifact}: evaluation needs the model directory", hint="pass --reference MODEL_DIR")
    note = None
    if data is None:
        data, note = _default_data(md)
    ds = load_dataset(data)
    cfg = reference.config if reference is not None else None
    bos = cfg.bos_token_id if cfg is not None else tok.token_to_id("<s>")
    eos = cfg.eos_token_ids[0] if cfg is not None and cfg.eos_token_ids else tok.token_to_id("</s>")
    ctx = cfg.max_position_embeddings if cfg is not None else 256
    windows = eval_windows(token_stream(tok, ds.val, bos_id=bos, eos_id=eos), min(seq_len, ctx), max_windows)
    targets = windows[:, 1:].reshape(-1)
    n_bytes = sum(len(tok.decode(w[1:].tolist(), skip_special_tokens=True).encode("utf-8")) for w in windows)
    ref_logits = score_windows(torch_scorer(reference), windows) if reference is not None else None

    logits, speed = _score_artifact(
        kind, artifact, md, reference, ref_logits, windows, threads=threads, speed_tokens=speed_tokens, bos=bos or 0
    )
    same = kind == "torch" and ref_logits is not None and logits is ref_logits
    metrics = compare_logits(logits, targets, None if same else ref_logits, n_bytes)
    if same:
        metrics.update(reference_perplexity=metrics["perplexity"], kl_divergence=0.0, top1_agreement=1.0)
    return {
        "artifact": str(artifact),
        "kind": kind,
        "size_bytes": artifact_size(artifact),
        "data": {
            "sha256": ds.sha256,
            "sources": [s["path"] for s in ds.sources],
            "split": "validation",
            **({"note": note} if note else {}),
        },
        "decode_tokens_per_second": round(speed, 1) if speed else None,
        "threads": threads,
        **metrics,
    }

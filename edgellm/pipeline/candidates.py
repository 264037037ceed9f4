"""Candidate artifacts for a model, and what each one costs and loses.

A *candidate* is one artifact format (``gguf-q4_k_m``, ``onnx-int8``, ...) of one model. Each is
produced once and measured once, independent of any hardware profile:

- quality against the unquantized model on an evaluation text: perplexity, KL divergence
  (reference ‖ candidate, nats/token) and top-1 agreement; the reference is the F32 GGUF run by
  llama.cpp (tests prove it matches the torch model within 1e-3);
- size, weights bytes, bytes read per decoded token, and a memory model
  (weights + KV cache + compute buffers) evaluated later at each profile's context length;
- decode tokens/s on this machine (1 thread) and the roofline *efficiency*: the share of this
  machine's measured memory bandwidth that decoding achieved (tok/s × bytes/token ÷ bandwidth).

Candidates are cached by a content hash of (model files, format, evaluation text, and the code
that made them; see :mod:`edgellm.pipeline.candidate_cache`): rebuilding unchanged inputs reuses
the artifact and its measurements.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import BuildError
from edgellm.formats import ALL_FORMATS, GGUF, GGUF_FORMATS, ONNX, ONNX_FORMATS, RUNTIME_NAMES, format_kind
from edgellm.pipeline._atomic import atomic_dir
from edgellm.pipeline.candidate_cache import CandidateCache, cache_key, hash_model_dir
from edgellm.pipeline.measurement import Measurement, MemoryModel

__all__ = [
    "ALL_FORMATS",
    "DEFAULT_EVAL_TEXT",
    "GGUF_FORMATS",
    "ONNX_FORMATS",
    "RUNTIME_NAMES",
    "CandidateCache",
    "CandidateSet",
    "Measurement",
    "MemoryModel",
    "build_candidates",
    "cache_key",
    "hash_model_dir",
    "kind_of",
    "onnx_supported",
    "quality_metrics",
]

log = logging.getLogger(__name__)


DEFAULT_EVAL_TEXT = (
    "The quick brown fox jumps over the lazy dog. A robot arm picks up the red block and places it "
    "on the shelf; the sensor reads 21.5 degrees. Café crème, naïve façade, über straße. "
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n"
    "The gateway reports the battery level every five minutes and sends a warning when it drops "
    "below twenty percent. Devices in the field restart after an update and check their health."
)


def kind_of(fmt: str) -> str:
    """The artifact kind of candidate format ``fmt``; unknown formats are refused."""
    kind = format_kind(fmt)
    if kind is None:
        raise BuildError(f"unknown candidate format {fmt!r}", hint=f"choose from {', '.join(ALL_FORMATS)}")
    return kind


# --------------------------------------------------------------------------- metrics


def quality_metrics(ref_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Perplexity of ``targets`` under ``logits``, KL(ref ‖ cand) and top-1 agreement, per position."""
    from edgellm.pipeline.evaluate import compare_logits

    m = compare_logits(logits, targets, ref_logits)
    return {k: m[k] for k in ("perplexity", "reference_perplexity", "kl_divergence", "top1_agreement")}


def eval_windows(ids: Sequence[int], window: int, max_tokens: int) -> list[list[int]]:
    ids = list(ids)[: max_tokens + 1]
    if len(ids) < 2:
        raise BuildError(
            "the evaluation text is too short (needs at least 2 tokens)", hint="pass a longer --eval-text file"
        )
    out = []
    for i in range(0, len(ids) - 1, window):
        w = ids[i : i + window + 1]
        if len(w) >= 2:
            out.append(w)
    return out


def _score(rt: Any, windows: list[list[int]]) -> np.ndarray:
    return np.concatenate([rt.logits(w[:-1]) for w in windows])


def _targets(windows: list[list[int]]) -> np.ndarray:
    return np.concatenate([np.asarray(w[1:]) for w in windows])


# --------------------------------------------------------------------------- GGUF candidates

#: llama.cpp beyond weights/KV/compute, as the agent's health check counts it (RSS growth from
#: before the runtime is imported): numpy + llama.cpp libraries (29.5 MiB here) + allocations (~6 MiB)
LLAMACPP_RUNTIME_BYTES = 36 * 2**20
#: onnxruntime beyond weights/KV/compute: a share of the weights (pre-packing) + session/arena
#: (48 MiB) + numpy, onnxruntime and tokenizers libraries (~40 MiB here)
ORT_RUNTIME_SHARE, ORT_RUNTIME_BYTES = 0.25, 88 * 2**20


def gguf_memory_model(info: Any, *, repacked_bytes: int = 0, n_ubatch: int = 256, kv_bytes: int = 2) -> MemoryModel:
    """llama.cpp's allocations: weights, F16 KV cache, compute buffer sized per ubatch, and a small
    fixed runtime share. ``repacked_bytes``: matrices resident twice (only if a repacked model is
    loaded with mmap, which :class:`LlamaCppRuntime` avoids by default).

    The compute buffer estimate (attention scores per position, plus logits/FFN/residual
    activations per ubatch) was checked against llama.cpp's own log here: 2.75 MiB at n_ctx 256
    and 11.5 MiB at n_ctx 2048 for the test model, estimated 4.9 and 11.9 MiB (conservative).
    """
    kv_pos = 2 * info.block_count * info.head_count_kv * info.head_dim * kv_bytes
    base = n_ubatch * (info.vocab_size + 4 * info.feed_forward_length + 6 * info.embedding_length) * 4
    per_pos = n_ubatch * info.head_count * 4
    return MemoryModel(info.weights_bytes, kv_pos, base, per_pos, repacked_bytes + LLAMACPP_RUNTIME_BYTES)


def gguf_tensor_stats(path: Path) -> tuple[int, int, int]:
    """(weight bytes a decode step streams, parameter count, bytes llama.cpp repacks on load).

    A decode step reads every matrix but only one row of the token embedding (unless the
    embedding doubles as the output projection). Repacked: matrices of :data:`REPACKED_TYPES`
    other than the token embedding (which is read by row lookup)."""
    import gguf

    from edgellm.runtime.llamacpp import REPACKED_TYPES

    r = gguf.GGUFReader(str(path))
    names = {t.name: int(t.n_bytes) for t in r.tensors}
    n_params = sum(int(t.n_elements) for t in r.tensors)
    repacked = sum(
        int(t.n_bytes) for t in r.tensors if t.tensor_type.name in REPACKED_TYPES and t.name != "token_embd.weight"
    )
    total = sum(names.values())
    if "output.weight" in names:
        emb = names.get("token_embd.weight", 0)
        rows = int(next(t.shape[1] for t in r.tensors if t.name == "token_embd.weight"))
        total -= emb - emb // max(1, rows)
    return total, n_params, repacked


def measure_gguf_decode(path: Path, *, n_tokens: int = 64, threads: int = 1, repeats: int = 2) -> float:
    """Decode tokens/s (greedy, EOS ignored) with our runtime; best of ``repeats``."""
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    with LlamaCppRuntime.load(path, threads=threads, context_length=min(512, n_tokens + 16)) as rt:
        return max(rt.decode_speed(n_tokens=n_tokens) for _ in range(repeats))


def build_gguf_candidate(
    model_dir: Path,
    fmt: str,
    work: Path,
    *,
    ref_logits: np.ndarray,
    windows: list[list[int]],
    bandwidth_gbps: float,
    threads: int = 1,
) -> tuple[Path, Measurement]:
    from edgellm.pipeline.export.gguf import export_gguf
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    art = work / f"model-{fmt[5:]}.gguf"
    report = export_gguf(model_dir, art, fmt)
    with LlamaCppRuntime.load(art, threads=threads, context_length=max(len(w) for w in windows)) as rt:
        info = rt.info
        q = quality_metrics(ref_logits, _score(rt, windows), _targets(windows))
    tps = measure_gguf_decode(art, threads=threads)
    bpt, n_params, repacked = gguf_tensor_stats(art)
    eff = tps * bpt / (bandwidth_gbps * 1e9)
    export = {k: report[k] for k in ("ftype", "type_counts", "fallbacks", "tied_embeddings", "tokenizer_pre")}
    m = Measurement(
        fmt=fmt,
        runtime=GGUF,
        artifact=str(art),
        size_bytes=art.stat().st_size,
        memory=gguf_memory_model(info),
        bytes_per_token=bpt,
        eval_tokens=int(len(_targets(windows))),
        decode_tokens_per_second=tps,
        efficiency=eff,
        bandwidth_here_gbps=bandwidth_gbps,
        export=export,
        **q,
    )
    m.extra["n_params"] = n_params
    m.extra["repacked_bytes"] = repacked  # loaded without mmap, so not resident twice
    m.extra["max_context_length"] = info.context_length
    return art, m


# --------------------------------------------------------------------------- ONNX candidates


def onnx_supported() -> bool:
    """True when build pipeline I's ONNX exporter and runtime, and onnxruntime, are importable."""
    import importlib.util

    try:
        return all(
            importlib.util.find_spec(m) is not None
            for m in ("edgellm.pipeline.export.onnx", "edgellm.runtime.onnx", "onnxruntime")
        )
    except (ImportError, ValueError):
        return False


def onnx_memory_model(
    rt: Any, weights_bytes: int, n_heads: int, ff: int, embd: int, *, n_ubatch: int = 256
) -> MemoryModel:
    """onnxruntime: weights in memory, F32 KV cache, activations of a prefill chunk, and the runtime
    share calibrated here (50M-parameter model: fp32 file 195 MiB -> 284 MiB peak RSS, int8 50 -> 128)."""
    kv_pos = 2 * rt.n_layers * rt.n_kv * rt.head_dim * 4
    base = n_ubatch * (rt.vocab_size + 4 * ff + 6 * embd) * 4
    runtime = int(ORT_RUNTIME_SHARE * weights_bytes) + ORT_RUNTIME_BYTES
    return MemoryModel(weights_bytes, kv_pos, base, n_ubatch * n_heads * 4, runtime)


def build_onnx_candidate(
    model_dir: Path,
    fmt: str,
    work: Path,
    *,
    ref_logits: np.ndarray,
    windows: list[list[int]],
    bandwidth_gbps: float,
    threads: int = 1,
    fp32_source: Path | None = None,
) -> tuple[Path, Measurement]:
    from edgellm.pipeline.export.gguf import read_config
    from edgellm.pipeline.export.onnx import export_onnx
    from edgellm.runtime.onnx import OnnxRuntime

    cfg = read_config(model_dir)
    art = work / ("model.onnx" if fmt == "onnx-fp32" else "model-int8.onnx")
    report = export_onnx(
        model_dir,
        art,
        fmt="onnx" if fmt == "onnx-fp32" else "onnx-int8",
        evaluate=False,
        fp32_source=fp32_source if fmt == "onnx-int8" else None,
    )

    size = art.stat().st_size
    n_head = int(cfg["num_attention_heads"])
    with OnnxRuntime.load(art, model_dir=model_dir, threads=threads) as rt:
        q = quality_metrics(ref_logits, np.concatenate([rt.logits(w[:-1]) for w in windows]), _targets(windows))
        tps = max(rt.decode_speed() for _ in range(2))
        mem = onnx_memory_model(rt, size, n_head, int(cfg["intermediate_size"]), int(cfg["hidden_size"]))
        max_ctx = rt.context_length
    bpt = size  # upper bound: ONNX files may hold the embedding twice (gather + tied lm_head)
    m = Measurement(
        fmt=fmt,
        runtime=ONNX,
        artifact=str(art),
        size_bytes=size,
        memory=mem,
        bytes_per_token=bpt,
        eval_tokens=int(len(_targets(windows))),
        decode_tokens_per_second=tps,
        efficiency=tps * bpt / (bandwidth_gbps * 1e9),
        bandwidth_here_gbps=bandwidth_gbps,
        export={"exporter": report.get("exporter"), "fallbacks": []},
        **q,
    )
    if report.get("params"):
        m.extra["n_params"] = int(report["params"])
    m.extra["max_context_length"] = max_ctx
    return art, m


# --------------------------------------------------------------------------- the whole set


@dataclasses.dataclass
class CandidateSet:
    model_dir: Path
    model_sha256: str
    eval_sha256: str
    bandwidth_here_gbps: float
    measurements: dict[str, Measurement]
    failures: dict[str, str]
    reference: dict[str, Any]
    bandwidth: dict[str, Any] = dataclasses.field(default_factory=dict)  # samples, median, spread


ProgressFn = Callable[[str, int, int], None]


class _Reference:
    """The unquantized reference (F32 GGUF in llama.cpp, F32 KV cache), built on first need:
    the evaluation windows and their logits every candidate is compared with."""

    def __init__(
        self,
        model_dir: Path,
        cache_dir: Path,
        model_sha: str,
        text: str,
        *,
        threads: int,
        window: int,
        max_eval_tokens: int,
        say: ProgressFn,
        total: int,
    ) -> None:
        self.model_dir, self.cache_dir, self.model_sha, self.text = model_dir, cache_dir, model_sha, text
        self.threads, self.window, self.max_eval_tokens = threads, window, max_eval_tokens
        self.say, self.total = say, total
        self.windows: list[list[int]] = []
        self.logits: np.ndarray | None = None
        self.info: dict[str, Any] = {"cached": True}

    def get(self) -> tuple[list[list[int]], np.ndarray]:
        from edgellm.pipeline.export.gguf import export_gguf
        from edgellm.runtime.llamacpp import LlamaCppRuntime

        if self.logits is not None:
            return self.windows, self.logits
        self.say("reference (F32)", 1, self.total)
        ref_dir = self.cache_dir / f"ref-{cache_key(self.model_sha, 'gguf-f32', '')[:32]}"
        ref_path = ref_dir / "model-f32.gguf"
        if not ref_path.is_file():
            with atomic_dir(ref_dir, overwrite=True) as tmp:
                export_gguf(self.model_dir, tmp / ref_path.name, "gguf-f32")
        with LlamaCppRuntime.load(ref_path, threads=self.threads, kv_cache_type="f32") as rt:
            # The evaluation text is the operator's (trusted) text in training format: role
            # markers are special tokens there, as pipeline I's tokenizer treats them.
            self.windows = eval_windows(
                rt.tokenize(self.text, add_bos=True, special=True),
                min(self.window, rt.context_length - 1),
                self.max_eval_tokens,
            )
            self.logits = _score(rt, self.windows)
            self.info = {
                "artifact": str(ref_path),
                "size_bytes": ref_path.stat().st_size,
                "context_length": rt.info.context_length,
                "vocab_size": rt.info.vocab_size,
            }
        return self.windows, self.logits


def build_candidates(
    model_dir: str | Path,
    formats: Sequence[str],
    *,
    cache_dir: str | Path,
    eval_text: str | None = None,
    bandwidth_gbps: float | None = None,
    threads: int = 1,
    max_eval_tokens: int = 512,
    window: int = 256,
    progress: ProgressFn | None = None,
) -> CandidateSet:
    """Export, quantize and measure every format in ``formats`` (cached by content hash)."""
    model_dir, cache_dir = Path(model_dir), Path(cache_dir)
    for f in formats:
        kind_of(f)
    say = progress or (lambda step, i, n: None)
    total = len(formats) + 2
    say("hashing model", 0, total)
    model_sha = hash_model_dir(model_dir)
    text = eval_text if eval_text is not None else DEFAULT_EVAL_TEXT
    eval_sha = hashlib.sha256(text.encode()).hexdigest()
    cache = CandidateCache(cache_dir)
    ref = _Reference(
        model_dir,
        cache_dir,
        model_sha,
        text,
        threads=threads,
        window=window,
        max_eval_tokens=max_eval_tokens,
        say=say,
        total=total,
    )

    fixed_bw = bandwidth_gbps
    meter: Any = None

    def bandwidth() -> float:
        """A bandwidth sample taken now (so each candidate's decode run sits between two), or the
        caller's fixed figure. The buffer (256 MiB) is larger than the models measured here and
        than most last-level caches: a cache-sized buffer measures the cache, not memory."""
        nonlocal meter
        if fixed_bw is not None:
            return fixed_bw
        if meter is None:
            from edgellm.hardware import BandwidthMeter

            say("measuring memory bandwidth here", 1, total)
            meter = BandwidthMeter(buffer_mb=256, threads=1)
        return meter.sample()

    measurements: dict[str, Measurement] = {}
    failures: dict[str, str] = {}
    for i, fmt in enumerate(formats, start=2):
        key = cache_key(model_sha, fmt, eval_sha, threads)
        hit = cache.get(key)
        if hit is not None:
            say(f"{fmt} (cached)", i, total)
            measurements[fmt] = hit
            continue
        windows, ref_logits = ref.get()  # a model llama.cpp cannot take fails the build here
        build = build_gguf_candidate if kind_of(fmt) == GGUF else build_onnx_candidate
        say(f"{fmt}: export + measure", i, total)
        work = cache_dir / f".work-{key[:16]}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        try:
            bw_before = bandwidth()
            reuse = _fp32_onnx(measurements) if fmt == "onnx-int8" else None  # export ONNX once per model
            art, m = build(
                model_dir,
                fmt,
                work,
                ref_logits=ref_logits,
                windows=windows,
                bandwidth_gbps=bw_before,
                threads=threads,
                **({"fp32_source": reuse} if reuse else {}),
            )
            _set_efficiency(m, [bw_before, bandwidth()])
            m.extra["build_seconds"] = round(time.perf_counter() - t0, 3)
            measurements[fmt] = cache.put(key, art, m)
        except Exception as e:
            log.warning("candidate %s failed: %s", fmt, e)
            log.debug("candidate %s failure", fmt, exc_info=True)
            failures[fmt] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            shutil.rmtree(work, ignore_errors=True)
    say("candidates ready", total, total)
    if meter is not None:
        res = meter.result()
        bandwidth_gbps, bw_info = res.median, res.to_dict()
    elif bandwidth_gbps is None:  # everything cached: report the figure the measurements used
        bandwidth_gbps = statistics.median([m.bandwidth_here_gbps for m in measurements.values()] or [0.0])
        bw_info = {"median_gbps": bandwidth_gbps, "method": "from the cached candidates"}
    else:
        bw_info = {"median_gbps": bandwidth_gbps, "method": "given by the caller"}
    cs = CandidateSet(model_dir, model_sha, eval_sha, bandwidth_gbps, measurements, failures, ref.info)
    cs.bandwidth = bw_info
    return cs


def _fp32_onnx(measurements: dict[str, Measurement]) -> Path | None:
    m = measurements.get("onnx-fp32")
    return Path(m.artifact) if m is not None and Path(m.artifact).is_file() else None


def _set_efficiency(m: Measurement, bw_samples: list[float]) -> None:
    """Efficiency from the bandwidth samples taken just before and after this candidate's decode
    run, capped at 1 (a decode faster than the roofline means the bandwidth figure was low, not
    that the device will beat its memory); the figures it came from go into the report."""
    bw = sum(bw_samples) / len(bw_samples)
    raw = m.decode_tokens_per_second * m.bytes_per_token / (bw * 1e9)
    m.bandwidth_here_gbps = bw
    m.efficiency = min(1.0, raw)
    m.extra["prediction_inputs"] = {
        "decode_tokens_per_second": m.decode_tokens_per_second,
        "bytes_per_token": m.bytes_per_token,
        "bandwidth_samples_gbps": [round(x, 3) for x in bw_samples],
        "bandwidth_gbps": round(bw, 3),
        "efficiency_measured": round(raw, 4),
        "efficiency_capped": raw > 1.0,
        "formula": "predicted tok/s = efficiency x profile bandwidth / bytes_per_token",
    }

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

Candidates are cached by a content hash of (model files, format, evaluation text, exporter and
library versions): rebuilding unchanged inputs reuses the artifact and its measurements.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import BuildError

log = logging.getLogger(__name__)

CACHE_SCHEMA = 4
GGUF_FORMATS = ("gguf-f16", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k_m", "gguf-q4_k_m", "gguf-q4_0")
ONNX_FORMATS = ("onnx-fp32", "onnx-int8")
ALL_FORMATS = ONNX_FORMATS + GGUF_FORMATS
#: runtime name in hardware profiles, per artifact kind
RUNTIME_NAMES = {"gguf": "llama.cpp", "onnx": "onnxruntime"}

DEFAULT_EVAL_TEXT = (
    "The quick brown fox jumps over the lazy dog. A robot arm picks up the red block and places it "
    "on the shelf; the sensor reads 21.5 degrees. Café crème, naïve façade, über straße. "
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n"
    "The gateway reports the battery level every five minutes and sends a warning when it drops "
    "below twenty percent. Devices in the field restart after an update and check their health."
)


def kind_of(fmt: str) -> str:
    kind = fmt.split("-", 1)[0]
    if kind not in RUNTIME_NAMES or fmt not in ALL_FORMATS:
        raise BuildError(f"unknown candidate format {fmt!r}", hint=f"choose from {', '.join(ALL_FORMATS)}")
    return kind


@dataclasses.dataclass
class MemoryModel:
    """Bytes a loaded candidate needs: weights + KV cache(ctx) + compute buffers(ctx) + runtime.

    ``runtime_bytes`` is what the runtime holds beyond those, calibrated here against the peak
    RSS the agent's health check measures (see docs/gguf.md): a few MiB for llama.cpp; for
    onnxruntime a share of the weights (pre-packed copies) plus its session and arena.
    """

    weights_bytes: int
    kv_bytes_per_position: int   # all layers, K and V, at the cache dtype the runtime uses
    compute_base_bytes: int      # per-ubatch activations independent of context
    compute_bytes_per_position: int  # per-ubatch attention scores that grow with context
    runtime_bytes: int = 0

    def at(self, context_length: int) -> dict[str, int]:
        kv = self.kv_bytes_per_position * context_length
        compute = self.compute_base_bytes + self.compute_bytes_per_position * context_length
        return {"weights_bytes": self.weights_bytes, "kv_cache_bytes": kv, "compute_bytes": compute,
                "runtime_bytes": self.runtime_bytes, "context_length": context_length,
                "peak_bytes": self.weights_bytes + kv + compute + self.runtime_bytes}


@dataclasses.dataclass
class Measurement:
    """Everything measured about one candidate (JSON-serialisable; cached)."""

    fmt: str
    runtime: str                 # "gguf" | "onnx"
    artifact: str                # path to the artifact file
    size_bytes: int
    memory: MemoryModel
    bytes_per_token: int         # weight bytes streamed per decoded token
    perplexity: float
    reference_perplexity: float
    kl_divergence: float
    top1_agreement: float
    eval_tokens: int
    decode_tokens_per_second: float
    efficiency: float            # decode tok/s × bytes_per_token ÷ bandwidth here
    bandwidth_here_gbps: float
    export: dict[str, Any] = dataclasses.field(default_factory=dict)
    cache_key: str = ""
    cached: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def runtime_name(self) -> str:
        return RUNTIME_NAMES[self.runtime]

    @property
    def quality_loss(self) -> float:
        """Relative perplexity increase vs the unquantized model (0.02 = +2%), floored at 0."""
        return max(0.0, self.perplexity / self.reference_perplexity - 1.0)

    def predicted_tokens_per_second(self, bandwidth_gbps: float) -> float:
        """Roofline: efficiency measured here × the device's bandwidth ÷ bytes read per token."""
        return self.efficiency * bandwidth_gbps * 1e9 / max(1, self.bytes_per_token)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(self.extra)
        d.pop("extra")
        d["quality_loss"] = self.quality_loss
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names and k != "extra"}
        known["memory"] = MemoryModel(**d["memory"])
        extra = {k: v for k, v in d.items() if k not in names and k != "quality_loss"}
        return cls(**known, extra=extra)


# --------------------------------------------------------------------------- hashing and cache

def hash_model_dir(model_dir: str | Path) -> str:
    """sha256 over the names and contents of the files a model directory is made of."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise BuildError(f"{model_dir} is empty", hint="pass an HF-format model directory")
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"edgellm_candidates": str(CACHE_SCHEMA)}
    for pkg in ("llama-cpp-python", "gguf", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def cache_key(model_sha256: str, fmt: str, eval_sha256: str, threads: int = 1) -> str:
    blob = json.dumps({"model": model_sha256, "fmt": fmt, "eval": eval_sha256, "threads": threads,
                       "versions": _versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class CandidateCache:
    """Directory cache: ``<dir>/<key>/{artifact, measurement.json}``; entries appear atomically."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def get(self, key: str) -> Measurement | None:
        entry = self.dir / key
        meta = entry / "measurement.json"
        if not meta.is_file():
            return None
        try:
            m = Measurement.from_dict(json.loads(meta.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable cache entry %s: %s", entry, e)
            return None
        art = entry / Path(m.artifact).name
        if not art.is_file() or art.stat().st_size != m.size_bytes:
            return None
        m.artifact, m.cached = str(art), True
        return m

    def put(self, key: str, artifact: Path, m: Measurement) -> Measurement:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shutil.copyfile(artifact, tmp / artifact.name)
        m = dataclasses.replace(m, artifact=str(self.dir / key / artifact.name), cache_key=key)
        (tmp / "measurement.json").write_text(json.dumps(m.to_dict(), indent=2, sort_keys=True))
        final = self.dir / key
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return m


# --------------------------------------------------------------------------- metrics

def quality_metrics(ref_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Perplexity of ``targets`` under ``logits``, KL(ref ‖ cand) and top-1 agreement, per position."""

    def logsm(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        m = x.max(-1, keepdims=True)
        return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))

    lr, lc = logsm(ref_logits), logsm(logits)
    idx = np.arange(len(targets))
    nll = -lc[idx, targets].mean()
    ref_nll = -lr[idx, targets].mean()
    kl = float((np.exp(lr) * (lr - lc)).sum(-1).mean())
    top1 = float((ref_logits.argmax(-1) == logits.argmax(-1)).mean())
    return {"perplexity": float(math.exp(nll)), "reference_perplexity": float(math.exp(ref_nll)),
            "kl_divergence": max(0.0, kl), "top1_agreement": top1}


def eval_windows(ids: Sequence[int], window: int, max_tokens: int) -> list[list[int]]:
    ids = list(ids)[: max_tokens + 1]
    if len(ids) < 2:
        raise BuildError("the evaluation text is too short (needs at least 2 tokens)",
                         hint="pass a longer --eval-text file")
    out = []
    for i in range(0, len(ids) - 1, window):
        w = ids[i:i + window + 1]
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
    repacked = sum(int(t.n_bytes) for t in r.tensors
                   if t.tensor_type.name in REPACKED_TYPES and t.name != "token_embd.weight")
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


def build_gguf_candidate(model_dir: Path, fmt: str, work: Path, *, ref_logits: np.ndarray,
                         windows: list[list[int]], bandwidth_gbps: float, threads: int = 1) -> tuple[Path, Measurement]:
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
    m = Measurement(fmt=fmt, runtime="gguf", artifact=str(art), size_bytes=art.stat().st_size,
                    memory=gguf_memory_model(info), bytes_per_token=bpt, eval_tokens=int(len(_targets(windows))),
                    decode_tokens_per_second=tps, efficiency=eff, bandwidth_here_gbps=bandwidth_gbps,
                    export=export, **q)
    m.extra["n_params"] = n_params
    m.extra["repacked_bytes"] = repacked  # loaded without mmap, so not resident twice
    m.extra["max_context_length"] = info.context_length
    return art, m


# --------------------------------------------------------------------------- ONNX candidates

def onnx_supported() -> bool:
    """True when build pipeline I's ONNX exporter and runtime, and onnxruntime, are importable."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None
                   for m in ("edgellm.pipeline.export.onnx", "edgellm.runtime.onnx", "onnxruntime"))
    except (ImportError, ValueError):
        return False


def onnx_memory_model(rt: Any, weights_bytes: int, n_heads: int, ff: int, embd: int,
                      *, n_ubatch: int = 256) -> MemoryModel:
    """onnxruntime: weights in memory, F32 KV cache, activations of a prefill chunk, and the runtime
    share calibrated here (50M-parameter model: fp32 file 195 MiB -> 284 MiB peak RSS, int8 50 -> 128)."""
    kv_pos = 2 * rt.n_layers * rt.n_kv * rt.head_dim * 4
    base = n_ubatch * (rt.vocab_size + 4 * ff + 6 * embd) * 4
    runtime = int(ORT_RUNTIME_SHARE * weights_bytes) + ORT_RUNTIME_BYTES
    return MemoryModel(weights_bytes, kv_pos, base, n_ubatch * n_heads * 4, runtime)


def build_onnx_candidate(model_dir: Path, fmt: str, work: Path, *, ref_logits: np.ndarray,
                         windows: list[list[int]], bandwidth_gbps: float, threads: int = 1) -> tuple[Path, Measurement]:
    from edgellm.pipeline.export.gguf import read_config
    from edgellm.pipeline.export.onnx import export_onnx
    from edgellm.runtime.onnx import OnnxRuntime

    cfg = read_config(model_dir)
    art = work / ("model.onnx" if fmt == "onnx-fp32" else "model-int8.onnx")
    report = export_onnx(model_dir, art, fmt="onnx" if fmt == "onnx-fp32" else "onnx-int8", evaluate=False)

    size = art.stat().st_size
    n_head = int(cfg["num_attention_heads"])
    with OnnxRuntime.load(art, model_dir=model_dir, threads=threads) as rt:
        q = quality_metrics(ref_logits, np.concatenate([rt.logits(w[:-1]) for w in windows]), _targets(windows))
        tps = max(rt.decode_speed() for _ in range(2))
        mem = onnx_memory_model(rt, size, n_head, int(cfg["intermediate_size"]), int(cfg["hidden_size"]))
        max_ctx = rt.context_length
    bpt = size  # upper bound: ONNX files may hold the embedding twice (gather + tied lm_head)
    m = Measurement(fmt=fmt, runtime="onnx", artifact=str(art), size_bytes=size, memory=mem, bytes_per_token=bpt,
                    eval_tokens=int(len(_targets(windows))), decode_tokens_per_second=tps,
                    efficiency=tps * bpt / (bandwidth_gbps * 1e9), bandwidth_here_gbps=bandwidth_gbps,
                    export={"exporter": report.get("exporter"), "fallbacks": []}, **q)
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


ProgressFn = Callable[[str, int, int], None]


def build_candidates(model_dir: str | Path, formats: Sequence[str], *, cache_dir: str | Path,
                     eval_text: str | None = None, bandwidth_gbps: float | None = None,
                     threads: int = 1, max_eval_tokens: int = 512, window: int = 256,
                     progress: ProgressFn | None = None) -> CandidateSet:
    """Export, quantize and measure every format in ``formats`` (cached by content hash)."""
    from edgellm.pipeline.export.gguf import export_gguf
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    model_dir = Path(model_dir)
    for f in formats:
        kind_of(f)
    say = progress or (lambda step, i, n: None)
    total = len(formats) + 2
    say("hashing model", 0, total)
    model_sha = hash_model_dir(model_dir)
    text = eval_text if eval_text is not None else DEFAULT_EVAL_TEXT
    eval_sha = hashlib.sha256(text.encode()).hexdigest()
    cache = CandidateCache(cache_dir)

    def bandwidth() -> float:  # measured once, only if some candidate must be measured
        nonlocal bandwidth_gbps
        if bandwidth_gbps is None:
            from edgellm.profiles import measure_bandwidth_gbps

            say("measuring memory bandwidth here", 1, total)
            bandwidth_gbps = measure_bandwidth_gbps(seconds=0.3, buffer_mb=64, threads=1)
        return bandwidth_gbps

    ref: dict[str, Any] = {}

    def reference() -> tuple[list[list[int]], np.ndarray]:
        """The unquantized reference (F32 GGUF in llama.cpp, F32 KV cache), built on first need."""
        if "logits" not in ref:
            say("reference (F32)", 1, total)
            ref_dir = Path(cache_dir) / f"ref-{cache_key(model_sha, 'gguf-f32', '')[:32]}"
            ref_path = ref_dir / "model-f32.gguf"
            if not ref_path.is_file():
                tmp = Path(cache_dir) / f".ref-tmp-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                export_gguf(model_dir, tmp / "model-f32.gguf", "gguf-f32")
                shutil.rmtree(ref_dir, ignore_errors=True)
                os.replace(tmp, ref_dir)
            with LlamaCppRuntime.load(ref_path, threads=threads, kv_cache_type="f32") as ref_rt:
                # The evaluation text is the operator's (trusted) text in training format: role
                # markers are special tokens there, as pipeline I's tokenizer treats them.
                ref["windows"] = eval_windows(ref_rt.tokenize(text, add_bos=True, special=True),
                                              min(window, ref_rt.context_length - 1), max_eval_tokens)
                ref["logits"] = _score(ref_rt, ref["windows"])
                ref["info"] = {"artifact": str(ref_path), "size_bytes": ref_path.stat().st_size,
                               "context_length": ref_rt.info.context_length, "vocab_size": ref_rt.info.vocab_size}
        return ref["windows"], ref["logits"]

    measurements: dict[str, Measurement] = {}
    failures: dict[str, str] = {}
    for i, fmt in enumerate(formats, start=2):
        key = cache_key(model_sha, fmt, eval_sha, threads)
        hit = cache.get(key)
        if hit is not None:
            say(f"{fmt} (cached)", i, total)
            measurements[fmt] = hit
            continue
        windows, ref_logits = reference()  # a model llama.cpp cannot take fails the build here
        kind = kind_of(fmt)
        say(f"{fmt}: export + measure", i, total)
        work = Path(cache_dir) / f".work-{key[:16]}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        try:
            if kind == "gguf":
                art, m = build_gguf_candidate(model_dir, fmt, work, ref_logits=ref_logits, windows=windows,
                                              bandwidth_gbps=bandwidth(), threads=threads)
            else:
                art, m = build_onnx_candidate(model_dir, fmt, work, ref_logits=ref_logits, windows=windows,
                                              bandwidth_gbps=bandwidth(), threads=threads)
            m.extra["build_seconds"] = round(time.perf_counter() - t0, 3)
            measurements[fmt] = cache.put(key, art, m)
        except Exception as e:  # noqa: BLE001 - one failed candidate must not sink the build
            log.warning("candidate %s failed: %s", fmt, e)
            log.debug("candidate %s failure", fmt, exc_info=True)
            failures[fmt] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            shutil.rmtree(work, ignore_errors=True)
    say("candidates ready", total, total)
    if bandwidth_gbps is None:  # everything cached: report the figure the measurements used
        bandwidth_gbps = max((m.bandwidth_here_gbps for m in measurements.values()), default=0.0)
    return CandidateSet(model_dir, model_sha, eval_sha, bandwidth_gbps, measurements, failures,
                        ref.get("info", {"cached": True}))

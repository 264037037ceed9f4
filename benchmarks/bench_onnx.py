"""ONNX int8 vs fp32, side by side in one run: file size, per-token decode speed, prompt
(prefill) speed, perplexity / KL / top-1 agreement against the fp32 torch model.

    .venv/bin/python benchmarks/bench_onnx.py                 # trains the tiny preset first (~1 min)
    .venv/bin/python benchmarks/bench_onnx.py --model DIR     # any HF-format Llama model directory

Decode speed alternates fp32 and int8 rounds (best of ``--repeats``) so both see the same
machine load. Prints a table and the int8/fp32 ratios; ``--json`` prints them as JSON.

REAL: onnxruntime on real exported fp32/int8 models, timed by tokens produced; quality against the real torch model. SIMULATED: nothing (the model is a tiny one trained here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _prefill_speed(rt, n: int = 128, repeats: int = 3) -> float:
    import numpy as np

    ids = np.arange(1, n + 1, dtype=np.int64).reshape(1, n) % rt.vocab_size
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        rt.batch_logits(ids)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main(argv: list[str] | None = None) -> int:
    print(
        "REAL: onnxruntime on real exported fp32/int8 models, timed by tokens produced; quality against the real torch model. SIMULATED: nothing (the model is a tiny one trained here).",
        flush=True,
    )
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: train the tiny preset)")
    ap.add_argument("--steps", type=int, default=300, help="training steps when no --model is given")
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens per round")
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds per format (best is kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from edgellm.pipeline.evaluate import evaluate_artifact
    from edgellm.pipeline.export.onnx import export_onnx
    from edgellm.runtime.onnx import OnnxRuntime

    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as td:
        work = Path(td)
        model_dir = args.model
        if model_dir is None:
            from edgellm.pipeline.train import TrainConfig, train_model

            print(f"training the tiny preset for {args.steps} steps ...", file=sys.stderr)
            model_dir = work / "tiny"
            train_model(
                "builtin:devices", "tiny", model_dir, TrainConfig(steps=args.steps, progress=True, eval_every=0)
            )
        paths = {"fp32": work / "fp32" / "model.onnx", "int8": work / "int8" / "model.onnx"}
        for name, fmt in (("fp32", "onnx"), ("int8", "onnx-int8")):
            paths[name].parent.mkdir()
            t0 = time.perf_counter()
            export_onnx(model_dir, paths[name], fmt=fmt, evaluate=False)
            print(f"exported {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rts = {k: OnnxRuntime.load(p, model_dir=model_dir, threads=args.threads) for k, p in paths.items()}
        decode = {k: 0.0 for k in rts}
        for _ in range(args.repeats):  # alternate so both formats see the same load
            for k, rt in rts.items():
                decode[k] = max(decode[k], rt.decode_speed(args.tokens))
        prefill = {k: _prefill_speed(rt, min(128, rt.context_length)) for k, rt in rts.items()}
        quality = {
            k: evaluate_artifact(p, model_dir=model_dir, max_windows=16, speed_tokens=1) for k, p in paths.items()
        }
        rows = {
            k: {
                "size_bytes": paths[k].stat().st_size,
                "decode_tokens_per_second": round(decode[k], 1),
                "ms_per_token": round(1000 / decode[k], 3),
                "prefill_tokens_per_second": round(prefill[k], 1),
                "perplexity": round(quality[k]["perplexity"], 4),
                "kl_divergence": quality[k]["kl_divergence"],
                "top1_agreement": round(quality[k]["top1_agreement"], 4),
            }
            for k in rts
        }
        ratios = {
            "size_int8_over_fp32": round(rows["int8"]["size_bytes"] / rows["fp32"]["size_bytes"], 3),
            "decode_speedup_int8": round(decode["int8"] / decode["fp32"], 2),
            "prefill_speedup_int8": round(prefill["int8"] / prefill["fp32"], 2),
            "perplexity_change": round(rows["int8"]["perplexity"] / rows["fp32"]["perplexity"] - 1, 5),
        }
        result = {
            "model": str(args.model or "tiny preset (trained here)"),
            "threads": args.threads,
            "decode_tokens": args.tokens,
            "repeats": args.repeats,
            "formats": rows,
            "ratios": ratios,
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"ONNX int8 vs fp32 — {result['model']}, {args.threads} thread(s), {args.tokens}-token decode, best of {args.repeats}"
    )
    print(
        f"{'format':<6} {'size MiB':>9} {'decode tok/s':>13} {'ms/token':>9} {'prefill tok/s':>14} {'ppl':>8} {'KL':>9} {'top-1':>7}"
    )
    for k, r in rows.items():
        print(
            f"{k:<6} {r['size_bytes'] / 2**20:>9.2f} {r['decode_tokens_per_second']:>13.1f} {r['ms_per_token']:>9.3f} "
            f"{r['prefill_tokens_per_second']:>14.1f} {r['perplexity']:>8.4f} {r['kl_divergence']:>9.2e} {r['top1_agreement']:>7.2%}"
        )
    print(
        f"int8/fp32: size {ratios['size_int8_over_fp32']:.3f}x, decode {ratios['decode_speedup_int8']:.2f}x faster, "
        f"prefill {ratios['prefill_speedup_int8']:.2f}x faster, perplexity {ratios['perplexity_change']:+.3%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""llama.cpp settings for small quantized models, side by side, as fractions of the bandwidth roofline.

    python benchmarks/bench_decode_settings.py [--hidden 768 --layers 16 --tokens 96 --rounds 3]

REAL: a random Llama (default 101M parameters; weights do not matter for speed) exported by
edgellm to F16, Q8_0 and Q4_K_M GGUF, run by ``LlamaCppRuntime`` (llama.cpp) at ``--threads``
threads; memory bandwidth measured by ``edgellm.hardware.BandwidthMeter`` in the same run, one
sample right before and one right after every decode measurement: by default a read pass over a
256 MiB buffer (a decode step reads its weights; ``--bandwidth-kind copy`` gives the STREAM-copy
figure, which reads lower and so flatters the fractions). Nothing is simulated.

For each format and each variant (flash attention off/on, F16 or q8_0 KV cache, mmap off,
batch/ubatch sizes) in interleaved rounds: decode tokens/s (greedy, ``--tokens`` tokens after a
1-token prompt), prompt tokens/s (a 128-token prefill), and the decode *fraction of the roofline*
= tok/s x bytes a decode step streams / bandwidth (the bandwidth being the mean of the two samples
around that run). Prints medians, the bandwidth spread and the load average (the machine is
shared: compare variants within one run, not across runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gguf import export_all, make_model

FORMATS = ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m")
VARIANTS: dict[str, dict] = {
    "fa-off": {"flash_attn": False},  # what the agent ran before
    "fa-on": {"flash_attn": True},
    "fa-on kv-q8_0": {"flash_attn": True, "kv_cache_type": "q8_0"},
    "fa-on no-mmap": {"flash_attn": True, "mmap": False},
    "fa-on batch64": {"flash_attn": True, "batch_size": 64, "ubatch_size": 64},
    "fa-on ubatch32": {"flash_attn": True, "batch_size": 256, "ubatch_size": 32},
}
DEFAULT_VARIANTS = "fa-off,fa-on,fa-on kv-q8_0,fa-on no-mmap"  # batch sizes: --variants (prefill only)


def run_one(path: Path, opts: dict, threads: int, tokens: int, meter) -> tuple[float, float, float, float, float]:
    """(decode tok/s, prefill tok/s, bandwidth around the decode run, decode tok per CPU-second,
    bandwidth per CPU-second around it)."""
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    with LlamaCppRuntime.load(path, threads=threads, context_length=256, **opts) as rt:
        rt.decode_speed(n_tokens=8)  # page in
        prompt = [5 + i % 200 for i in range(128)]
        t0 = time.perf_counter()
        rt.logits(prompt)
        prefill = len(prompt) / (time.perf_counter() - t0)
        bw0 = meter.sample()
        c0 = time.process_time()
        tps = rt.decode_speed(n_tokens=tokens)
        cpu = time.process_time() - c0
        bw1 = meter.sample()
    return tps, prefill, (bw0 + bw1) / 2, tokens / cpu, (meter.cpu_samples[-2] + meter.cpu_samples[-1]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--buffer-mb", type=int, default=256, help="bandwidth buffer (above the last-level cache)")
    ap.add_argument("--bandwidth-kind", choices=("read", "copy"), default="read", help="the roofline's bandwidth")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"from: {', '.join(VARIANTS)}")
    ap.add_argument("--quick", action="store_true", help="a short run (smaller model, fewer rounds)")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.tokens, args.rounds = 512, 8, 32, 1

    from edgellm.hardware import BandwidthMeter
    from edgellm.pipeline.candidates import gguf_tensor_stats

    variants = [v for v in args.variants.split(",") if v]
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        work = Path(tmp)
        paths = export_all(make_model(work, args.hidden, args.layers), work, FORMATS)
        bpt = {f: gguf_tensor_stats(p)[0] for f, p in paths.items()}
        n_params = gguf_tensor_stats(paths["gguf-f16"])[1]
        meter = BandwidthMeter(args.buffer_mb, threads=args.threads, kind=args.bandwidth_kind)
        res: dict[tuple[str, str], list[tuple[float, float, float, float, float]]] = {}
        for r in range(args.rounds):
            for f in FORMATS:
                for v in variants:
                    res.setdefault((f, v), []).append(run_one(paths[f], VARIANTS[v], args.threads, args.tokens, meter))
            print(
                f"round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True
            )
        bw = meter.result()
    load1 = os.getloadavg()
    print(
        f"REAL: llama.cpp decode of a random {n_params / 1e6:.0f}M-parameter Llama, {args.threads} thread(s), "
        f"{args.tokens} tokens x {args.rounds} interleaved rounds; bandwidth measured in the same run"
    )
    print(f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end on {os.cpu_count()} CPUs (shared machine)")
    d = bw.to_dict()
    print(
        f"bandwidth ({bw.kind} pass, {bw.buffer_mb} MiB, {len(bw.samples)} samples): median {d['median_gbps']:.2f} "
        f"GB/s, min {d['min_gbps']:.2f}, max {d['max_gbps']:.2f}, spread {bw.spread:.0%}; per CPU-second: median "
        f"{statistics.median(bw.cpu_samples):.2f} GB/s"
    )
    print(
        f"{'format':<12} {'MiB/tok':>7} {'variant':<15} {'decode tok/s':>12} {'prefill tok/s':>13} "
        f"{'fraction':>8} {'vs first':>9} {'CPU fraction':>12}   CPU fractions per round"
    )
    for f in FORMATS:
        base = None
        for v in variants:
            runs = res[(f, v)]
            fr = [r[0] * bpt[f] / (r[2] * 1e9) for r in runs]
            cfr = [r[3] * bpt[f] / (r[4] * 1e9) for r in runs]
            tps = statistics.median(r[0] for r in runs)
            base = base or tps
            print(
                f"{f:<12} {bpt[f] / 2**20:7.1f} {v:<15} {tps:12.1f} {statistics.median(r[1] for r in runs):13.0f} "
                f"{statistics.median(fr):8.2f} {tps / base:8.2f}x {statistics.median(cfr):12.2f}   "
                f"{' '.join(f'{x:.2f}' for x in cfr)}"
            )
    print(
        "fraction = decode tok/s x bytes per token / bandwidth (bandwidth: mean of the samples just before and "
        "after that run). CPU fraction: the same with tokens and bandwidth both per CPU-second of this process, "
        "which time-slicing by other processes does not distort. Batch sizes only change prefill."
    )


if __name__ == "__main__":
    main()

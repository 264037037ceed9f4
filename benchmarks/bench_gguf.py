"""GGUF formats side by side: Q4_K_M and Q8_0 vs F16 decode speed and size, in one run.

    .venv/bin/python benchmarks/bench_gguf.py [--hidden 768 --layers 8 --tokens 128 --rounds 3]

Builds a random Llama (transformers, ~50M parameters by default; weights do not matter for
speed), exports it with ``edgellm.pipeline.export.gguf.export_gguf`` to F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M and
Q4_0, then measures greedy decode tokens/s with ``LlamaCppRuntime`` (1 thread) in interleaved
rounds (F16, Q8_0, ... then again) so a busy machine affects every format alike; prints the
median and the ratio to F16, and checks the build's memory model against the peak RSS measured in
a fresh process.

REAL: llama.cpp decoding real GGUF files, timed by tokens received. SIMULATED: nothing; the weights are random (speed and size do not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

FORMATS = ("gguf-f16", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k_m", "gguf-q4_k_m", "gguf-q4_0")


def make_model(work: Path, hidden: int, layers: int, intermediate: int | None = None) -> Path:
    from fixtures_gguf import make_hf_llama

    heads = max(4, hidden // 64)
    return make_hf_llama(
        work / "hf",
        train_steps=0,
        hidden=hidden,
        intermediate=intermediate or hidden * 8 // 3 // 256 * 256,
        layers=layers,
        heads=heads,
        kv_heads=max(1, heads // 3) if heads % 3 == 0 else heads // 2,
    )


def export_all(model_dir: Path, work: Path, formats=FORMATS) -> dict[str, Path]:
    from edgellm.pipeline.export.gguf import export_gguf

    out = {}
    for fmt in formats:
        out[fmt] = work / f"{fmt}.gguf"
        export_gguf(model_dir, out[fmt], fmt)
    return out


def decode_speeds(paths: dict[str, Path], tokens: int, rounds: int, threads: int = 1) -> dict[str, list[float]]:
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    runtimes = {f: LlamaCppRuntime.load(p, threads=threads, context_length=tokens + 32) for f, p in paths.items()}
    return interleaved_speeds(runtimes, tokens, rounds)


def interleaved_speeds(runtimes: dict, tokens: int, rounds: int) -> dict[str, list[float]]:
    """Greedy decode tokens/s of each runtime, in interleaved rounds; closes the runtimes."""
    speeds: dict[str, list[float]] = {f: [] for f in runtimes}
    try:
        for rt in runtimes.values():  # warm-up (page in the weights)
            rt.decode_speed(n_tokens=8)
        for _ in range(rounds):
            for f, rt in runtimes.items():
                speeds[f].append(rt.decode_speed(n_tokens=tokens))
    finally:
        for rt in runtimes.values():
            rt.close()
    return speeds


_RSS_PROBE = r"""
import sys
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
from edgellm.runtime import GenerationParams  # no numpy yet: as in the agent's health check
base = hwm()  # before the runtime is imported, as the agent's health check counts
from edgellm.runtime.llamacpp import LlamaCppRuntime
rt = LlamaCppRuntime.load(sys.argv[1], context_length=int(sys.argv[2]))
rt.logits(list(range(5, 5 + min(256, int(sys.argv[2]) - 1))))
rt.complete("The robot", GenerationParams(max_tokens=16))
print(hwm() - base)
"""


def peak_rss(path: Path, ctx: int) -> int:
    """Peak RSS growth of import + load + prefill + decode in a fresh process (what the agent's health
    check counts)."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(path), str(ctx)], capture_output=True, text=True, check=True, timeout=300
    )
    return int(out.stdout.split()[-1])


def main() -> None:
    print(
        "REAL: llama.cpp decoding real GGUF files, timed by tokens received. SIMULATED: nothing; the weights are random (speed and size do not depend on them).",
        flush=True,
    )
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        work = Path(tmp)
        model = make_model(work, args.hidden, args.layers)
        paths = export_all(model, work)
        speeds = decode_speeds(paths, args.tokens, args.rounds, args.threads)
        from edgellm.pipeline.candidates import gguf_memory_model
        from edgellm.runtime.llamacpp import check_gguf

        ctx = 512
        est = {f: gguf_memory_model(check_gguf(p)).at(ctx)["peak_bytes"] for f, p in paths.items()}
        rss = {f: peak_rss(p, ctx) for f, p in paths.items()}
        f16_size = paths["gguf-f16"].stat().st_size
        f16_tps = statistics.median(speeds["gguf-f16"])
        print(
            f"model: hidden {args.hidden}, {args.layers} layers; decode {args.tokens} tokens x {args.rounds} "
            f"interleaved rounds, {args.threads} thread(s)"
        )
        print(
            f"{'format':<12} {'size MiB':>9} {'size/F16':>9} {'tok/s':>8} {'speed/F16':>10} "
            f"{'est MiB':>8} {'RSS MiB':>8} {'est/RSS':>8}   runs"
        )
        for f in FORMATS:
            size = paths[f].stat().st_size
            tps = statistics.median(speeds[f])
            runs = " ".join(f"{x:.0f}" for x in speeds[f])
            print(
                f"{f:<12} {size / 2**20:9.1f} {size / f16_size:9.2f} {tps:8.1f} {tps / f16_tps:9.2f}x "
                f"{est[f] / 2**20:8.1f} {rss[f] / 2**20:8.1f} {est[f] / rss[f]:8.2f}   {runs}"
            )
        print(
            f"est = edgellm's memory model at ctx {ctx} (weights + KV + compute + runtime); RSS = measured peak "
            f"RSS growth of runtime import + load + 255-token prefill + 16 tokens in a fresh process"
        )


if __name__ == "__main__":
    main()

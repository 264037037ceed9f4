"""llama.cpp threads when the device's cores are shared with other work.

    python benchmarks/bench_threads.py [--hidden 768 --layers 16 --tokens 64 --rounds 3]

REAL: llama.cpp decode (``LlamaCppRuntime``) of a random Llama exported to Q8_0 by edgellm.
SIMULATED: the "other work" on the device: ``--busy`` child processes each spinning one core
(a pure-Python loop), standing in for the application the device exists for.

For each thread count (1 .. the CPUs here) and each number of busy processes (0 .. the CPUs), in
interleaved rounds: decode tokens/s and the CPU seconds the decoding process burns per token
(llama.cpp's worker threads spin while they wait for each other, so CPU per token rises with
threads even when tokens/s does not). Prints medians and the load average (shared machine: the
other engineers' work is extra, unmeasured competition).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gguf import export_all, make_model

SPIN = "import time\nwhile True:\n    pass\n"


def decode(path: Path, threads: int, tokens: int) -> tuple[float, float]:
    """(tokens/s, CPU seconds per token) of this process while decoding."""
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    with LlamaCppRuntime.load(path, threads=threads, context_length=256, flash_attn=True) as rt:
        rt.decode_speed(n_tokens=8)
        c0 = time.process_time()
        tps = rt.decode_speed(n_tokens=tokens)
        cpu = time.process_time() - c0
    return tps, cpu / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a short run (smaller model, fewer rounds)")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.tokens, args.rounds = 512, 8, 32, 1
    cpus = len(os.sched_getaffinity(0))
    load0 = os.getloadavg()
    res: dict[tuple[int, int], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        work = Path(tmp)
        path = export_all(make_model(work, args.hidden, args.layers), work, ("gguf-q8_0",))["gguf-q8_0"]
        for _ in range(args.rounds):
            for busy in range(cpus + 1):
                spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
                try:
                    time.sleep(0.2)
                    for threads in range(1, cpus + 1):
                        res.setdefault((threads, busy), []).append(decode(path, threads, args.tokens))
                finally:
                    for p in spinners:
                        p.kill()
                        p.wait()
    load1 = os.getloadavg()
    print(
        f"REAL: llama.cpp Q8_0 decode, {args.tokens} tokens x {args.rounds} interleaved rounds. SIMULATED: the "
        f"device's other work (busy-loop processes, one core each)"
    )
    print(
        f"{cpus} CPUs; load average {load0[0]:.2f} at start, {load1[0]:.2f} at end (shared machine: others' work "
        f"competes too)"
    )
    print(f"{'threads':>7} {'busy procs':>10} {'tok/s':>8} {'vs 1 thread':>11} {'CPU ms/token':>12}   tok/s per round")
    for busy in range(cpus + 1):
        one = statistics.median(r[0] for r in res[(1, busy)])
        for threads in range(1, cpus + 1):
            runs = res[(threads, busy)]
            tps = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            print(
                f"{threads:>7} {busy:>10} {tps:8.1f} {tps / one:10.2f}x {cpu * 1e3:12.2f}   "
                f"{' '.join(f'{r[0]:.0f}' for r in runs)}"
            )


if __name__ == "__main__":
    main()

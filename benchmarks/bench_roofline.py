"""Decode speed as a fraction of this machine's memory-bandwidth roofline, and what it predicts.

    .venv/bin/python benchmarks/bench_roofline.py [--hidden 768 --layers 8 --tokens 128 --rounds 3]

Measures this machine's sustained read bandwidth (1 thread, as ``edgellm build`` does),
then for each GGUF format of a ~50M-parameter random Llama: decode tokens/s (1 thread), the
bytes a decode step streams, the roofline bound (bandwidth ÷ bytes per token) and the achieved
fraction of it (the *efficiency* ``edgellm build`` multiplies by each profile's bandwidth).
Bandwidth is measured before and after the decode runs; both are printed.

REAL: llama.cpp decode timed by tokens received, and this machine's measured bandwidth. SIMULATED: nothing; the weights are random (decode speed does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gguf import FORMATS, decode_speeds, export_all, make_model


def main() -> None:
    print(
        "REAL: llama.cpp decode timed by tokens received, and this machine's measured bandwidth. SIMULATED: nothing; the weights are random (decode speed does not depend on them).",
        flush=True,
    )
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profiles", default="rpi4-4gb,rpi5-8gb,jetson-orin-nano-8gb")
    args = ap.parse_args()

    from edgellm.hardware import measure_bandwidth_gbps
    from edgellm.pipeline.candidates import gguf_tensor_stats
    from edgellm.profiles import get_profile

    with tempfile.TemporaryDirectory(prefix="bench-roofline-") as tmp:
        work = Path(tmp)
        paths = export_all(make_model(work, args.hidden, args.layers), work)
        bw_before = measure_bandwidth_gbps(seconds=1.0, buffer_mb=256, threads=1)
        speeds = decode_speeds(paths, args.tokens, args.rounds)
        bw_after = measure_bandwidth_gbps(seconds=1.0, buffer_mb=256, threads=1)
        bw = max(bw_before, bw_after)
        profiles = [get_profile(p) for p in args.profiles.split(",") if p]
        print(
            f"memory read bandwidth here (1 thread): {bw_before:.2f} GB/s before, {bw_after:.2f} GB/s "
            f"after; using {bw:.2f}"
        )
        head = f"{'format':<12} {'MiB/token':>9} {'roofline':>9} {'tok/s':>8} {'fraction':>9}"
        head += "".join(f" {p.name[:14]:>15}" for p in profiles)
        print(head)
        print(" " * 50 + "".join(f" {f'{p.bandwidth_gbps:g} GB/s':>15}" for p in profiles))
        for f in FORMATS:
            bpt, _, _ = gguf_tensor_stats(paths[f])
            roof = bw * 1e9 / bpt
            tps = statistics.median(speeds[f])
            eff = tps / roof
            preds = "".join(f" {eff * p.bandwidth_gbps * 1e9 / bpt:13.0f}/s" for p in profiles)
            print(f"{f:<12} {bpt / 2**20:9.1f} {roof:9.1f} {tps:8.1f} {eff:8.0%} {preds}")
        print(
            "fraction = decode tok/s ÷ (bandwidth ÷ bytes per token); profile columns: predicted tok/s "
            "= fraction × profile bandwidth ÷ bytes per token"
        )


if __name__ == "__main__":
    main()

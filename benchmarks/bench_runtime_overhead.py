"""Our LlamaCppRuntime vs calling llama-cpp-python directly: decode tokens/s, side by side.

    .venv/bin/python benchmarks/bench_runtime_overhead.py [--hidden 512 --layers 4 --tokens 128 --rounds 5]

Same Q8_0 GGUF, same short prompt, greedy, 1 thread, interleaved rounds:

- ``ours``: ``LlamaCppRuntime.generate`` (our decode loop, numpy sampling, UTF-8 streaming,
  stop handling, logprobs from the last logits);
- ``ours-nolp``: the same without logprobs;
- ``llama.generate``: ``llama_cpp.Llama.generate(top_k=1)`` (llama-cpp-python's own loop and
  native sampler chain);
- ``create_completion``: ``Llama.create_completion(temperature=0)`` (the high-level API).

Prints the median tokens/s and the ratio to ``llama.generate``.

REAL: llama.cpp through both paths on the same GGUF, timed by tokens received. SIMULATED: nothing; the weights are random.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gguf import export_all, make_model


def main() -> None:
    print(
        "REAL: llama.cpp through both paths on the same GGUF, timed by tokens received. SIMULATED: nothing; the weights are random.",
        flush=True,
    )
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from edgellm.runtime import GenerationParams
    from edgellm.runtime.llamacpp import LlamaCppRuntime, import_llama_cpp

    llama_cpp = import_llama_cpp()
    prompt = "The robot reads the temperature"
    with tempfile.TemporaryDirectory(prefix="bench-rt-") as tmp:
        work = Path(tmp)
        path = export_all(make_model(work, args.hidden, args.layers), work, formats=("gguf-q8_0",))["gguf-q8_0"]
        n_ctx = 512
        ours = LlamaCppRuntime.load(path, threads=1, context_length=n_ctx)
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=256, n_threads=1, n_threads_batch=1, verbose=False
        )
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)

        def run_ours(logprobs: bool) -> tuple[int, float]:
            t0 = time.perf_counter()
            n = sum(1 for _ in ours.generate(prompt, GenerationParams(max_tokens=args.tokens, logprobs=logprobs)))
            return n, time.perf_counter() - t0

        def run_generate() -> tuple[int, float]:
            llm.reset()
            t0 = time.perf_counter()
            n = 0
            for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
                n += 1
                if n >= args.tokens or tok == llm.token_eos():
                    break
            return n, time.perf_counter() - t0

        def run_completion() -> tuple[int, float]:
            llm.reset()
            t0 = time.perf_counter()
            out = llm.create_completion(prompt, max_tokens=args.tokens, temperature=0.0)
            dt = time.perf_counter() - t0
            choice = out["choices"][0]  # usage counts are unreliable here; derive the count
            n = (
                args.tokens
                if choice["finish_reason"] == "length"
                else len(llm.tokenize(choice["text"].encode(), add_bos=False, special=False)) + 1
            )
            return n, dt

        cases = {
            "ours": lambda: run_ours(True),
            "ours-nolp": lambda: run_ours(False),
            "llama.generate": run_generate,
            "create_completion": run_completion,
        }
        for fn in cases.values():  # warm-up
            fn()
        speeds: dict[str, list[float]] = {k: [] for k in cases}
        counts: dict[str, int] = {}
        for _ in range(args.rounds):
            for k, fn in cases.items():
                n, dt = fn()
                speeds[k].append(n / dt)
                counts[k] = n
        ours.close()
        llm.close()

    base = statistics.median(speeds["llama.generate"])
    print(
        f"Q8_0 model: hidden {args.hidden}, {args.layers} layers; up to {args.tokens} tokens x {args.rounds} "
        f"interleaved rounds, 1 thread, greedy"
    )
    print(f"{'path':<18} {'tokens':>6} {'tok/s':>8} {'vs direct':>10}   runs")
    for k in cases:
        med = statistics.median(speeds[k])
        print(f"{k:<18} {counts[k]:>6} {med:8.1f} {med / base:9.2f}x   " + " ".join(f"{x:.0f}" for x in speeds[k]))


if __name__ == "__main__":
    main()

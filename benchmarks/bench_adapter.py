"""Adapter bundle vs full bundle: bytes on the wire, and decode speed with the adapter applied vs merged.

    .venv/bin/python benchmarks/bench_adapter.py [--hidden 768 --layers 16 --rank 16 --targets attn
                                                  --format gguf-q8_0 --tokens 128 --rounds 3]

Builds a random Llama of at least 100 MB at Q8_0 (transformers; weights do not matter for size or
speed), a rank-R LoRA adapter on it (random, non-zero), then with the real ``edgellm build``
pipeline, signed in a real TUF repository: the full bundle (``run_build``) and the adapter bundle
(``run_adapter_build``) for the same profile. Prints both signed envelopes' bytes and their ratio
(the issue's bar: at most 5% for rank <= 16), the seconds each takes over a shared 1 Gbit/s link
and a 10 Mbit/s cellular link, then greedy decode tokens/s of base + adapter (llama.cpp applies
it at run time) vs the merged model at the same format, in interleaved rounds so a busy machine
affects both alike.

REAL: the edgellm build and TUF signing (bundle bytes as written), llama.cpp decode timed by tokens received. SIMULATED: nothing; base weights and adapter are random (sizes and speed do not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

TARGETS = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def make_adapter(model_dir: Path, out: Path, rank: int, targets: tuple[str, ...]) -> Path:
    import torch

    from edgellm.pipeline.candidate_cache import hash_model_dir
    from edgellm.pipeline.finetune import save_adapter
    from edgellm.pipeline.lora import LoraConfig, initial_lora_state
    from edgellm.pipeline.model import load_config

    cfg = LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
    state = initial_lora_state(load_config(model_dir), cfg, seed=0)
    gen = torch.Generator().manual_seed(1)
    for k, v in state.items():  # a trained-looking adapter: B is no longer zero
        if k.endswith(".lora_B"):
            state[k] = torch.randn(v.shape, generator=gen) * 0.01
    return save_adapter(
        out, state, cfg, base_sha256=hash_model_dir(model_dir), base_name=model_dir.name, report={"kind": "benchmark"}
    )


def decode(paths: dict[str, tuple[Path, Path | None]], tokens: int, rounds: int) -> dict[str, list[float]]:
    from bench_gguf import interleaved_speeds

    from edgellm.runtime.llamacpp import LlamaCppRuntime
    from edgellm.runtime.lora import LoraAdapters

    rts = {}
    for label, (gguf, adapter) in paths.items():
        rt = LlamaCppRuntime.load(gguf, threads=1, context_length=tokens + 32)
        if adapter is not None:
            lora = LoraAdapters(rt)
            lora.load("a", adapter)
            lora.activate("a")
        rts[label] = rt
    return interleaved_speeds(rts, tokens, rounds)


def main() -> None:
    print(
        "REAL: the edgellm build and TUF signing (bundle bytes as written), llama.cpp decode timed by tokens received. SIMULATED: nothing; base weights and adapter are random (sizes and speed do not depend on them).",
        flush=True,
    )
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", choices=sorted(TARGETS), default="attn")
    ap.add_argument("--format", default="gguf-q8_0")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from bench_gguf import make_model

    from edgellm.pipeline.adapter_build import run_adapter_build
    from edgellm.pipeline.export.gguf import export_gguf
    from edgellm.pipeline.finetune import merge_adapter
    from edgellm.pipeline.fleet_build import BuildConfig, run_build, wire_bytes
    from edgellm.trust import Repository, init_keys

    with tempfile.TemporaryDirectory(prefix="bench-adapter-") as tmp:
        work = Path(tmp)
        model = make_model(work, args.hidden, args.layers, intermediate=2048)
        adapter = make_adapter(model, work / "adapter", args.rank, TARGETS[args.targets])
        init_keys(work / "keys")
        Repository.create(work / "repo", work / "keys")
        common = {
            "profiles": ["rpi5-8gb"],
            "formats": [args.format],
            "repo": work / "repo",
            "keys": work / "keys",
            "cache_dir": work / "cache",
            "eval_text": "The robot arm picks up the red block.\n" * 8,
        }
        full = run_build(BuildConfig(model_dir=model, out_dir=work / "full", name="base", **common))
        delta = run_adapter_build(
            BuildConfig(model_dir=model, out_dir=work / "delta", name="base", **common),
            adapter,
            base_version="0.1.0",
            adapter_name="delta",
        )
        full_bytes = wire_bytes(full.results[0])["bundle_bytes"]
        w = wire_bytes(delta.results[0])
        merged = merge_adapter(model, adapter, work / "merged")
        export_gguf(merged, work / "merged.gguf", args.format)
        base_gguf = Path(full.candidates.measurements[args.format].artifact)
        from edgellm.pipeline.export.gguf_lora import write_lora_gguf
        from edgellm.pipeline.finetune import load_adapter

        ad = load_adapter(adapter)
        write_lora_gguf(ad.state, ad.rank, ad.alpha, model, work / "adapter.gguf", dtype="F16")
        speeds = decode(
            {"base + adapter": (base_gguf, work / "adapter.gguf"), "merged": (work / "merged.gguf", None)},
            args.tokens,
            args.rounds,
        )

        ratio = w["bundle_bytes"] / full_bytes
        print(
            f"model: hidden {args.hidden}, {args.layers} layers, {args.format}; adapter rank {args.rank} on "
            f"{','.join(TARGETS[args.targets])}"
        )
        print(f"{'signed bundle':<22} {'bytes':>12} {'MiB':>8} {'1 Gbit/s s':>11} {'10 Mbit/s s':>12}")
        for label, n in (("full (" + args.format + ")", full_bytes), ("adapter (F16 LoRA)", w["bundle_bytes"])):
            print(f"{label:<22} {n:12d} {n / 2**20:8.2f} {n * 8 / 1e9:11.3f} {n * 8 / 1e7:12.1f}")
        print(
            f"adapter / full = {ratio:.2%}  ({'within' if ratio <= 0.05 else 'OVER'} the 5% bar); "
            f"100 devices: {100 * full_bytes / 1e9:.2f} GB vs {100 * w['bundle_bytes'] / 1e9:.3f} GB"
        )
        med = {k: statistics.median(v) for k, v in speeds.items()}
        print(f"decode, 1 thread, {args.tokens} tokens x {args.rounds} interleaved rounds:")
        for k, v in speeds.items():
            print(f"  {k:<16} {med[k]:8.1f} tok/s   runs {' '.join(f'{x:.0f}' for x in v)}")
        print(f"  adapter applied / merged = {med['base + adapter'] / med['merged']:.2f}x")


if __name__ == "__main__":
    main()

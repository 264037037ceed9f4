"""Benchmark of the device agent, side by side in one run on one bundle:

* streamed tokens/s through the agent's API (official ``openai`` client, SSE) vs calling the
  runtime directly (``load_runtime(...).generate``) on the same bundle, same prompts, greedy;
* the agent's idle RSS without a model, and with the model loaded.

    .venv/bin/python benchmarks/bench_agent.py [--gguf model.gguf] [--requests 20] [--max-tokens 64]

Without ``--gguf`` it trains and exports the tiny test model (needs torch/transformers, the
build extras). Both sides run llama.cpp with 1 thread.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PROMPTS = ["The robot", "The sensor reads", "def camera_1(x):", "The drone checks the battery",
           "Hello", "The pump stops", "The gateway sends a warning", "The valve"]


def tiny_gguf(work: Path) -> Path:
    from fixtures_gguf import make_hf_llama

    from edgellm.pipeline.export.gguf import export_gguf

    hf = make_hf_llama(work / "hf")
    out = work / "tiny-q8_0.gguf"
    export_gguf(hf, out, "gguf-q8_0")
    return out


def bench_direct(slot: Path, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    from edgellm.bundle import Manifest
    from edgellm.runtime import GenerationParams, load_runtime

    m = Manifest.load(slot / "manifest.json")
    rt = load_runtime(m.runtime, slot / m.artifact, model_dir=slot, threads=1, context_length=m.memory.context_length)
    try:
        n = 0
        t0 = time.perf_counter()
        for p in prompts:
            for _ev in rt.generate(rt.tokenize(p, special=False), GenerationParams(max_tokens=max_tokens)):
                n += 1
        return n, time.perf_counter() - t0
    finally:
        rt.close()


def bench_api(a, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    import openai

    client = openai.OpenAI(base_url=a.base_url + "/v1", api_key=a.token, max_retries=0)
    n = 0
    t0 = time.perf_counter()
    for p in prompts:
        stream = client.completions.create(model="tiny", prompt=p, max_tokens=max_tokens, stream=True,
                                           stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                n += chunk.usage.completion_tokens
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, help="GGUF model to bundle (default: train the tiny test model)")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each side is reported")
    args = ap.parse_args()

    import httpx
    from fixtures_agent import AgentProcess, agent_cli, make_gguf_bundle, provision_agent

    from edgellm.trust import Repository, init_keys

    with tempfile.TemporaryDirectory(prefix="bench-agent-") as td:
        work = Path(td)
        gguf = args.gguf or tiny_gguf(work)
        bundle = make_gguf_bundle(work, gguf, version="1.0.0", golden=[{"prompt": "Hello", "max_tokens": 4}])
        root = init_keys(work / "keys")
        repo = Repository.create(work / "repo", work / "keys")
        envelope = repo.export_signed(repo.add_bundle(bundle), work / "tiny.signed")

        # idle agent: provisioned, no model
        d = provision_agent(work / "agent", root)
        with AgentProcess(d) as a:
            time.sleep(1.0)
            idle_rss = a.rss_bytes()
        agent_cli("install", str(envelope), data_dir=d)
        slot = d / "slots" / "A"
        prompts = (PROMPTS * (args.requests // len(PROMPTS) + 1))[: args.requests]
        with AgentProcess(d) as a:
            httpx.post(a.base_url + "/v1/completions", headers=a.headers,
                       json={"model": "tiny", "prompt": "warm up", "max_tokens": 8})
            loaded_rss = a.rss_bytes()
            direct, api = [], []
            for _ in range(args.rounds):  # alternate so machine load hits both sides alike
                direct.append(bench_direct(slot, prompts, args.max_tokens))
                api.append(bench_api(a, prompts, args.max_tokens))
            served_rss = a.rss_bytes()
        d_tok, d_s = max(direct, key=lambda x: x[0] / x[1])
        a_tok, a_s = max(api, key=lambda x: x[0] / x[1])
        d_tps, a_tps = d_tok / d_s, a_tok / a_s
        print(f"bundle: {gguf.name} ({gguf.stat().st_size / 2**20:.1f} MiB), {args.requests} requests x <= "
              f"{args.max_tokens} tokens, greedy, 1 thread, best of {args.rounds} alternating rounds")
        print(f"{'path':38} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
        print(f"{'runtime directly (generate)':38} {d_tok:7d} {d_s:8.3f} {d_tps:8.1f}")
        print(f"{'agent API, streamed (openai client)':38} {a_tok:7d} {a_s:8.3f} {a_tps:8.1f}")
        print(f"API / direct throughput ratio: {a_tps / d_tps:.3f}  (API cost per request: "
              f"{(a_s - d_s) / args.requests * 1000:.2f} ms over {a_tok / args.requests:.1f} tokens/request: "
              "HTTP + SSE + client parsing; it shrinks relative to generation as outputs and models grow)")
        print(f"agent RSS idle without a model: {idle_rss / 2**20:.1f} MiB; with the model loaded: "
              f"{loaded_rss / 2**20:.1f} MiB; after the benchmark: {served_rss / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

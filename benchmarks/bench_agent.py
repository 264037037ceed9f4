"""The device agent against llama-cpp-python's own loop, side by side in one run on one file:

* ``Llama.generate``: llama-cpp-python's generation loop (native greedy sampler), in this process;
* ``runtime``: edgellm's ``load_runtime(...).generate`` on the installed slot, in this process;
* ``agent API``: a real ``edgellm-agent run`` process serving the same slot, streamed through its
  OpenAI-compatible API (official ``openai`` client, SSE) over loopback TCP;
* ``agent API, unix``: the same process through its Unix socket (``--socket``), as device software
  on the same board would reach it.

All three run llama.cpp with the settings the agent resolves from the bundle's manifest
(threads, flash attention, KV-cache type), read back from what llama.cpp was given. Reported per
side: streamed tokens/s and CPU seconds per token (this process's CPU for the in-process sides,
the agent process's CPU from /proc for the API side), medians of interleaved rounds, plus the
agent's RSS.

    python benchmarks/bench_agent.py [--hidden 768 --layers 16] [--gguf model.gguf] [--threads 1]

REAL: everything (agent process, HTTP, llama.cpp). The model is a random Llama exported to Q8_0
(default 101M parameters: weights do not matter for speed), or ``--gguf``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = [
    "The robot",
    "The sensor reads",
    "def camera_1(x):",
    "The drone checks the battery",
    "Hello",
    "The pump stops",
    "The gateway sends a warning",
    "The valve",
]


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def bench_raw(path: Path, settings, prompts: list[str], max_tokens: int) -> tuple[int, float, float]:
    """llama-cpp-python's Llama.generate loop; (tokens, seconds, CPU seconds)."""
    import llama_cpp

    from edgellm.runtime.llamacpp import KV_TYPES, import_llama_cpp

    import_llama_cpp()  # quiet native log
    kv = KV_TYPES[settings.kv_cache_type]
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        n_batch=settings.batch_size,
        n_ubatch=settings.ubatch_size,
        n_threads=settings.threads,
        n_threads_batch=settings.threads,
        flash_attn=settings.flash_attn,
        type_k=kv,
        type_v=kv,
        verbose=False,
    )
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    try:
        n = 0
        c0, t0 = time.process_time(), time.perf_counter()
        for p in prompts:
            k = 0
            for tok in llm.generate(
                llm.tokenize(p.encode(), add_bos=True, special=False), top_k=1, temp=0.0, reset=True
            ):
                if llama_cpp.llama_vocab_is_eog(vocab, tok):
                    break
                llm.detokenize([tok])  # streamed text, as a server would produce it
                k += 1
                if k >= max_tokens:
                    break
            n += k
        return n, time.perf_counter() - t0, time.process_time() - c0
    finally:
        llm.close()


def bench_runtime(slot: Path, settings, prompts: list[str], max_tokens: int) -> tuple[int, float, float]:
    from edgellm.bundle import Manifest
    from edgellm.runtime import GenerationParams, load_runtime

    m = Manifest.load(slot / "manifest.json")
    rt = load_runtime(
        m.runtime, slot / m.artifact, model_dir=slot, settings=settings, context_length=m.memory.context_length
    )
    try:
        n = 0
        c0, t0 = time.process_time(), time.perf_counter()
        for p in prompts:
            for _ev in rt.generate(rt.tokenize(p, special=False), GenerationParams(max_tokens=max_tokens)):
                n += 1
        return n, time.perf_counter() - t0, time.process_time() - c0
    finally:
        rt.close()


def bench_api(a, prompts: list[str], max_tokens: int, uds: str | None = None) -> tuple[int, float, float]:
    """The agent's API with the official client, over loopback TCP or (``uds``) its Unix socket."""
    import httpx
    import openai

    http = httpx.Client(transport=httpx.HTTPTransport(uds=uds), timeout=120) if uds else None
    base = "http://agent" if uds else a.base_url
    client = openai.OpenAI(base_url=base + "/v1", api_key=a.token, max_retries=0, http_client=http)
    n = 0
    c0, t0 = _proc_cpu_s(a.proc.pid), time.perf_counter()
    for p in prompts:
        stream = client.completions.create(
            model="tiny", prompt=p, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}
        )
        for chunk in stream:
            if chunk.usage is not None:
                n += chunk.usage.completion_tokens
    out = n, time.perf_counter() - t0, _proc_cpu_s(a.proc.pid) - c0
    if http is not None:
        http.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, help="GGUF model to bundle (default: a random Llama, --hidden/--layers)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a short run (smaller model, fewer rounds)")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.requests, args.max_tokens, args.rounds = 512, 8, 4, 32, 2

    import httpx
    from bench_gguf import export_all, make_model
    from fixtures_agent import AgentProcess, agent_cli, make_gguf_bundle, provision_agent

    from edgellm.bundle import Manifest
    from edgellm.runtime.settings import RuntimeSettings, resolve
    from edgellm.trust import Repository, init_keys

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as td:
        work = Path(td)
        gguf = args.gguf or export_all(make_model(work, args.hidden, args.layers), work, ("gguf-q8_0",))["gguf-q8_0"]
        model_desc = f"{gguf.name} ({gguf.stat().st_size / 2**20:.1f} MiB)"
        bundle = make_gguf_bundle(
            work,
            gguf,
            version="1.0.0",
            golden=[{"prompt": "Hello", "max_tokens": 4}],
            extra={"runtime_settings": RuntimeSettings(threads=args.threads).to_dict()},
        )
        root = init_keys(work / "keys")
        repo = Repository.create(work / "repo", work / "keys")
        envelope = repo.export_signed(repo.add_bundle(bundle), work / "tiny.signed")
        d = provision_agent(work / "agent", root)
        with AgentProcess(d) as a:
            time.sleep(1.0)
            idle_rss = a.rss_bytes()
        for attempt in range(3):  # the install's health check has a tokens/s floor a busy machine can miss
            r = agent_cli("install", str(envelope), *(("--force",) if attempt else ()), data_dir=d, check=False)
            if r.returncode == 0:
                break
            print(f"install attempt {attempt + 1} failed (machine busy?): {r.stderr.strip()[:200]}", file=sys.stderr)
        else:
            raise SystemExit("the bundle did not pass the agent's health check; retry when the machine is quieter")
        slot = d / "slots" / "A"
        settings = resolve(Manifest.load(slot / "manifest.json"))  # what the agent gives llama.cpp
        prompts = (PROMPTS * (args.requests // len(PROMPTS) + 1))[: args.requests]
        sides: dict[str, list[tuple[int, float, float]]] = {
            "Llama.generate": [],
            "runtime": [],
            "agent API": [],
            "agent API, unix": [],
        }
        uds = str(work / "agent.sock")
        with AgentProcess(d, "--socket", uds) as a:
            httpx.post(
                a.base_url + "/v1/completions",
                headers=a.headers,
                json={"model": "tiny", "prompt": "warm up", "max_tokens": 8},
                timeout=120,
            )
            loaded_rss = a.rss_bytes()
            for _ in range(args.rounds):  # interleaved, so machine load hits every side alike
                sides["Llama.generate"].append(bench_raw(slot / "model.gguf", settings, prompts, args.max_tokens))
                sides["runtime"].append(bench_runtime(slot, settings, prompts, args.max_tokens))
                sides["agent API"].append(bench_api(a, prompts, args.max_tokens))
                sides["agent API, unix"].append(bench_api(a, prompts, args.max_tokens, uds=uds))
            served_rss = a.rss_bytes()
    load1 = os.getloadavg()
    print(
        f"REAL: agent process + HTTP/SSE (loopback TCP and its Unix socket) + llama.cpp; model {model_desc}; "
        f"{args.requests} requests x <= {args.max_tokens} tokens, greedy, {args.rounds} interleaved rounds"
    )
    print(f"llama.cpp settings on every side (from the manifest, as the agent resolves them): {settings.to_dict()}")
    print(
        f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end on {os.cpu_count()} CPUs (shared machine; "
        "the API side also needs a core for the client)"
    )
    base_tps = statistics.median(n / s for n, s, _ in sides["Llama.generate"])
    base_cpu = statistics.median(c / n for n, _, c in sides["Llama.generate"] if n)
    print(f"{'side':<17} {'tok/s':>8} {'vs raw':>7} {'CPU ms/tok':>10} {'vs raw':>7}   tok/s per round")
    for name, runs in sides.items():
        tps = statistics.median(n / s for n, s, _ in runs)
        cpu = statistics.median(c / n for n, _, c in runs if n)
        print(
            f"{name:<17} {tps:8.1f} {tps / base_tps:6.2f}x {cpu * 1e3:10.2f} {cpu / base_cpu:6.2f}x   "
            f"{' '.join(f'{n / s:.0f}' for n, s, _ in runs)}"
        )
    print(
        f"agent RSS idle without a model: {idle_rss / 2**20:.1f} MiB; with the model loaded: "
        f"{loaded_rss / 2**20:.1f} MiB; after the benchmark: {served_rss / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    main()

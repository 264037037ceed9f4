"""Health check of a freshly unpacked slot, run in a child process.

llama.cpp aborts the whole process on some malformed metadata, so the daemon never
loads an unproven model in its own process: ``run_health_check`` starts
``python -m agent.health`` which loads the slot, runs the bundle's golden prompts, measures
tokens/s and peak memory, and writes a JSON report. A child that crashes, hangs past the timeout
or reports a failed check means the slot never becomes current.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgellm.bundle import GoldenPrompt, Manifest
    from edgellm.profiles import Profile

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Hello"


@dataclasses.dataclass
class HealthBudget:
    """Limits a new model must meet (the stricter of the bundle's own and the profile's).

    ``max_memory_bytes`` also bounds the child's address space (``RLIMIT_AS``): what the process
    had mapped before loading, plus the budget, plus ``headroom_bytes`` for the runtime's own
    mappings (thread stacks, allocator arenas). A model that needs more cannot be loaded at all,
    so an over-budget model fails its check instead of pushing the device into the OOM killer."""

    min_tokens_per_second: float | None = None
    max_memory_bytes: int | None = None
    threads: int | None = None  # None: the manifest's runtime settings (capped at the usable CPUs)
    headroom_bytes: int = 256 << 20

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def budget_for(manifest: Manifest, profile: Profile | None, *, threads: int | None = None) -> HealthBudget:
    min_tps = manifest.health.get("min_tokens_per_second")
    max_mem = manifest.health.get("max_memory_bytes")
    p_tps = getattr(profile, "min_tokens_per_second", None)
    p_mem = getattr(profile, "usable_ram_bytes", None)
    if p_tps is not None:
        min_tps = max(float(min_tps or 0), float(p_tps))
    if p_mem is not None:
        max_mem = min(int(max_mem), int(p_mem)) if max_mem else int(p_mem)
    return HealthBudget(
        min_tokens_per_second=float(min_tps) if min_tps else None,
        max_memory_bytes=int(max_mem) if max_mem else None,
        threads=threads,
    )


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


PARENT_ENV = "EDGELLM_AGENT_HEALTH_PARENT"


def _set_pdeathsig() -> None:
    """Die with the parent (kill -9 of the agent must not leave a health check running).

    Runs first thing in the child (not as a ``preexec_fn``, which is unsafe in a threaded
    daemon); a parent that died before this point is caught by the ppid check."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    expected = os.environ.get(PARENT_ENV)
    if expected and os.getppid() != int(expected):
        os._exit(1)


def run_health_check(
    slot_dir: str | Path, budget: HealthBudget, *, timeout: float = 300.0, adapter_dir: str | Path | None = None
) -> dict:
    """Run the check in a child process; returns its report (``ok`` False on any failure).

    With ``adapter_dir`` (an installed adapter bundle), the slot's base is checked with that
    adapter applied, on the adapter's own golden prompts."""
    with tempfile.TemporaryDirectory(prefix="edgellm-health-") as td:
        out = Path(td) / "report.json"
        cmd = [
            sys.executable,
            "-m",
            "agent.health",
            "--slot",
            str(slot_dir),
            "--out",
            str(out),
            "--budget",
            json.dumps(budget.to_dict()),
        ]
        if adapter_dir is not None:
            cmd += ["--adapter", str(adapter_dir)]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(budget.threads or 1),
            "OMP_WAIT_POLICY": "PASSIVE",
            "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MiB of address space per arena otherwise
            PARENT_ENV: str(os.getpid()),
        }
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True)
        except subprocess.TimeoutExpired:
            return {"ok": False, "reason": f"health check did not finish within {timeout:.0f} s"}
        elapsed = time.monotonic() - t0
        if proc.returncode != 0:
            rc = proc.returncode
            how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
            reason = f"health check process {how} while loading/running the model"
            if budget.max_memory_bytes:
                reason += (
                    f" (its address space was limited to the memory budget of "
                    f"{budget.max_memory_bytes / 2**20:.0f} MiB + headroom: a model over budget ends like this)"
                )
            return {"ok": False, "reason": reason, "stderr": tail, "duration_s": elapsed}
        try:
            report = json.loads(out.read_text())
        except (OSError, ValueError):
            return {"ok": False, "reason": "health check wrote no report"}
        report["duration_s"] = elapsed
        return report


# -- child side -----------------------------------------------------------------------------------


def limit_address_space(budget: HealthBudget) -> int | None:
    """Cap this process's address space at what it maps now + the memory budget + headroom."""
    if not budget.max_memory_bytes:
        return None
    import resource

    limit = _proc_status_bytes("VmSize") + budget.max_memory_bytes + budget.headroom_bytes
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


def _run_golden(rt: Any, gp: GoldenPrompt) -> tuple[dict, list[str], int, float]:
    """One golden prompt, greedy: (result, failures, tokens, seconds)."""
    from edgellm.runtime import GenerationParams

    if gp.chat:
        ids = rt.chat_token_ids([{"role": "user", "content": gp.prompt}])
    else:
        ids = rt.tokenize(gp.prompt, add_bos=True, special=False)
    t1 = time.perf_counter()
    comp = rt.complete(ids, GenerationParams(max_tokens=gp.max_tokens or 16, temperature=0.0, logprobs=True))
    dt = time.perf_counter() - t1
    failures = []
    if not comp.token_ids:
        failures.append(f"golden prompt {gp.prompt[:40]!r}: produced no tokens")
    bad = sum(1 for x in comp.logprobs if not math.isfinite(x))
    if bad:  # NaN/inf log-probabilities: broken weights or a broken runtime, whatever the text says
        failures.append(
            f"golden prompt {gp.prompt[:40]!r}: {bad} of {len(comp.logprobs)} tokens have a "
            "non-finite log-probability (NaN or inf)"
        )
    if gp.expect is not None and gp.expect not in comp.text:
        failures.append(
            f"golden prompt {gp.prompt[:40]!r}: expected {gp.expect!r} in the output, got {comp.text[:80]!r}"
        )
    res = {"prompt": gp.prompt[:200], "ok": not failures, "tokens": len(comp.token_ids), "text": comp.text[:200]}
    return res, failures, len(comp.token_ids), dt


def check_slot(slot_dir: Path, budget: HealthBudget, adapter_dir: Path | None = None) -> dict:
    from agent.manifest import read_manifest
    from edgellm.bundle import GoldenPrompt
    from edgellm.runtime import load_runtime
    from edgellm.runtime.settings import resolve

    manifest = read_manifest(slot_dir)
    adapter = read_manifest(adapter_dir) if adapter_dir is not None else None
    _import_backend(manifest.runtime)  # its libraries are mapped before the limit is measured
    baseline = _proc_status_bytes("VmRSS")
    limit = limit_address_space(budget)
    t0 = time.perf_counter()
    try:
        rt = load_runtime(
            manifest.runtime,
            slot_dir / manifest.artifact,
            model_dir=slot_dir,
            settings=resolve(manifest, budget.threads),
            context_length=manifest.memory.context_length or None,
        )
    except MemoryError:
        return {"ok": False, "reason": _over_limit(limit)}
    failures: list[str] = []
    results = []
    n_tokens, gen_s = 0, 0.0
    try:
        if adapter is not None and adapter_dir is not None:
            from edgellm.runtime.lora import LoraAdapters

            art = adapter.file(adapter.artifact)
            lora = LoraAdapters(rt)
            lora.load(adapter.name, adapter_dir / adapter.artifact, sha256=art.sha256, size=art.size)
            lora.activate(adapter.name)
            manifest = adapter  # its golden prompts judge base + adapter
        load_s = time.perf_counter() - t0
        for gp in manifest.golden_prompts or [GoldenPrompt(prompt=DEFAULT_PROMPT, max_tokens=8)]:
            res, fails, n, dt = _run_golden(rt, gp)
            results.append(res)
            failures += fails
            n_tokens += n
            gen_s += dt
    finally:
        rt.close()
    tps = n_tokens / gen_s if gen_s > 0 else 0.0
    peak = _proc_status_bytes("VmHWM")
    model_mem = max(0, peak - baseline)
    if budget.min_tokens_per_second and tps < budget.min_tokens_per_second:
        failures.append(f"{tps:.1f} tokens/s is below the budget of {budget.min_tokens_per_second:.1f}")
    if budget.max_memory_bytes and model_mem > budget.max_memory_bytes:
        failures.append(
            f"model used {model_mem / 2**20:.1f} MiB, over the budget of {budget.max_memory_bytes / 2**20:.1f} MiB"
        )
    return {
        "ok": not failures,
        "reason": "; ".join(failures) or None,
        "load_s": round(load_s, 4),
        "tokens_per_second": round(tps, 2),
        "memory_bytes": model_mem,
        "peak_rss_bytes": peak,
        "address_space_limit_bytes": limit,
        "golden": results,
        "budget": budget.to_dict(),
    }


def _import_backend(kind: str) -> None:
    if kind == "gguf":
        from edgellm.runtime.llamacpp import import_llama_cpp

        import_llama_cpp()
    elif kind == "onnx":
        import onnxruntime  # noqa: F401 - imported before the limit so its mappings count as the baseline


def _over_limit(limit: int | None) -> str:
    return (
        f"the model does not fit the memory budget: loading it needed more than the "
        f"{(limit or 0) / 2**20:.0f} MiB address-space limit of the health check"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.health")
    ap.add_argument("--slot", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", default="{}")
    ap.add_argument("--adapter", default=None, help="an installed adapter bundle to apply on the slot's base")
    a = ap.parse_args(argv)
    _set_pdeathsig()
    logging.basicConfig(level=logging.WARNING)
    budget = HealthBudget(**json.loads(a.budget))
    crash = os.environ.get("EDGELLM_AGENT_CRASH_AT")  # crash-safety test hooks
    if crash == "health_child":  # the agent dies while its health check runs
        os.kill(os.getppid(), 9)
        time.sleep(5)
    elif crash == "health_abort":  # the model aborts the process, as llama.cpp does on some bad metadata
        os.abort()
    try:
        report = check_slot(Path(a.slot), budget, Path(a.adapter) if a.adapter else None)
    except (MemoryError, SystemError) as e:  # SystemError: C code whose allocation failed under the limit
        report = {
            "ok": False,
            "reason": "the model does not fit the memory budget (out of memory under the "
            f"health check's address-space limit: {type(e).__name__})",
        }
    except Exception as e:  # noqa: BLE001 - a model that cannot load is a failed check, not a crash of it
        report = {"ok": False, "reason": f"{type(e).__name__}: {e}"}
    Path(a.out).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Health check of a freshly unpacked slot, run in a child process.

llama.cpp aborts the whole process on some malformed metadata (FIELD-NOTES), so the daemon never
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
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Hello"


@dataclasses.dataclass
class HealthBudget:
    """Limits a new model must meet (the stricter of the bundle's own and the profile's)."""

    min_tokens_per_second: float | None = None
    max_memory_bytes: int | None = None
    threads: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def budget_for(manifest: Any, profile: Any | None, *, threads: int = 1) -> HealthBudget:
    from agent.manifest import mget

    health = mget(manifest, "health") or {}
    min_tps = mget(health, "min_tokens_per_second")
    max_mem = mget(health, "max_memory_bytes")
    if profile is not None:
        p_tps = _profile_value(profile, ("min_tokens_per_second",))
        p_mem = _profile_value(profile, ("usable_ram_bytes",))
        if p_tps is not None:
            min_tps = max(float(min_tps or 0), float(p_tps))
        if p_mem is not None:
            max_mem = min(int(max_mem), int(p_mem)) if max_mem else int(p_mem)
    return HealthBudget(min_tokens_per_second=float(min_tps) if min_tps else None,
                        max_memory_bytes=int(max_mem) if max_mem else None, threads=threads)


def _profile_value(profile: Any, names: tuple[str, ...]) -> Any:
    for n in names:
        for obj in (profile, getattr(profile, "budget", None), getattr(profile, "limits", None)):
            v = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
            if v is not None and not callable(v):
                return v
    return None


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


def run_health_check(slot_dir: str | Path, budget: HealthBudget, *, timeout: float = 300.0) -> dict:
    """Run the check in a child process; returns its report (``ok`` False on any failure)."""
    with tempfile.TemporaryDirectory(prefix="edgellm-health-") as td:
        out = Path(td) / "report.json"
        cmd = [sys.executable, "-m", "agent.health", "--slot", str(slot_dir), "--out", str(out),
               "--budget", json.dumps(budget.to_dict())]
        env = {**os.environ, "OMP_NUM_THREADS": str(budget.threads), "OMP_WAIT_POLICY": "PASSIVE",
               PARENT_ENV: str(os.getpid())}
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
            return {"ok": False, "reason": f"health check process {how} while loading/running the model",
                    "stderr": tail, "duration_s": elapsed}
        try:
            report = json.loads(out.read_text())
        except (OSError, ValueError):
            return {"ok": False, "reason": "health check wrote no report"}
        report["duration_s"] = elapsed
        return report


# -- child side -----------------------------------------------------------------------------------

def check_slot(slot_dir: Path, budget: HealthBudget) -> dict:
    from agent.manifest import mget, read_manifest
    from edgellm.runtime import GenerationParams, load_runtime

    baseline = _proc_status_bytes("VmRSS")
    manifest = read_manifest(slot_dir)
    memory = mget(manifest, "memory")
    t0 = time.perf_counter()
    rt = load_runtime(mget(manifest, "runtime"), slot_dir / mget(manifest, "artifact"), model_dir=slot_dir,
                      threads=budget.threads, context_length=mget(memory, "context_length"))
    load_s = time.perf_counter() - t0
    failures: list[str] = []
    prompts = list(mget(manifest, "golden_prompts") or []) or [{"prompt": DEFAULT_PROMPT, "max_tokens": 8}]
    results = []
    n_tokens = 0
    gen_s = 0.0
    try:
        for gp in prompts:
            prompt = mget(gp, "prompt")
            expect = mget(gp, "expect")
            max_tokens = int(mget(gp, "max_tokens") or 16)
            if mget(gp, "chat"):
                ids = rt.chat_token_ids([{"role": "user", "content": prompt}])
            else:
                ids = rt.tokenize(prompt, add_bos=True, special=False)
            t1 = time.perf_counter()
            comp = rt.complete(ids, GenerationParams(max_tokens=max_tokens, temperature=0.0))
            gen_s += time.perf_counter() - t1
            n_tokens += len(comp.token_ids)
            ok = len(comp.token_ids) > 0 and all(math.isfinite(x) for x in comp.logprobs if x == x)
            if expect is not None and expect not in comp.text:
                ok = False
                failures.append(f"golden prompt {prompt[:40]!r}: expected {expect!r} in the output, got {comp.text[:80]!r}")
            elif not ok:
                failures.append(f"golden prompt {prompt[:40]!r}: produced no valid tokens")
            results.append({"prompt": prompt[:200], "ok": ok, "tokens": len(comp.token_ids), "text": comp.text[:200]})
    finally:
        rt.close()
    tps = n_tokens / gen_s if gen_s > 0 else 0.0
    peak = _proc_status_bytes("VmHWM")
    model_mem = max(0, peak - baseline)
    if budget.min_tokens_per_second and tps < budget.min_tokens_per_second:
        failures.append(f"{tps:.1f} tokens/s is below the budget of {budget.min_tokens_per_second:.1f}")
    if budget.max_memory_bytes and model_mem > budget.max_memory_bytes:
        failures.append(f"model used {model_mem / 2**20:.1f} MiB, over the budget of {budget.max_memory_bytes / 2**20:.1f} MiB")
    return {
        "ok": not failures,
        "reason": "; ".join(failures) or None,
        "load_s": round(load_s, 4),
        "tokens_per_second": round(tps, 2),
        "memory_bytes": model_mem,
        "peak_rss_bytes": peak,
        "golden": results,
        "budget": budget.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.health")
    ap.add_argument("--slot", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", default="{}")
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
        report = check_slot(Path(a.slot), budget)
    except Exception as e:  # a model that cannot load is a failed check, not a crash of the check
        report = {"ok": False, "reason": f"{type(e).__name__}: {e}"}
    Path(a.out).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

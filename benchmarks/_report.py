"""Run every ``bench_*.py`` script and write the benchmarks page (``docs/benchmarks.md``) from their output.

The page is generated, never edited by hand: one section per script with the exact command, the
machine it ran on (cores, CPU, a measured memory bandwidth, load average before and after) and the
script's stdout verbatim. A script that fails or times out gets a section saying so, with the end of
its stderr; the exit status is 1 when any script failed, after the page is written.

A script is run with ``--quick`` when its ``--help`` lists that option (the short run), otherwise
with its defaults; ``--full`` never adds ``--quick``.

    .venv/bin/python benchmarks/_report.py [--benchmarks benchmarks] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STDERR_TAIL = 40  # lines of a failed script's stderr kept in the page


@dataclass(frozen=True)
class Result:
    script: str
    argv: list[str]
    returncode: int | None  # None: timed out
    stdout: str
    stderr: str
    seconds: float
    load_before: str
    load_after: str


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(bandwidth_seconds: float) -> str:
    """One line describing the machine: cores, CPU, measured bandwidth (single thread), Python, OS.

    Load average is given per script (before and after it), and once for the whole run."""
    from edgellm.hardware import measure_bandwidth_gbps

    bw = measure_bandwidth_gbps(seconds=bandwidth_seconds)
    return (
        f"{os.cpu_count()} cores ({cpu_model()}, {platform.machine()}), memory bandwidth "
        f"{bw:.1f} GB/s measured (1 thread, read pass), "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def wants_quick(python: str, script: Path, env: dict[str, str]) -> bool:
    try:
        out = subprocess.run(
            [python, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
        )
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and "--quick" in out.stdout


def run_script(python: str, script: Path, full: bool, timeout: float) -> Result:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    argv = [python, str(script)]
    if not full and wants_quick(python, script, env):
        argv.append("--quick")
    before = load_average()
    t0 = time.perf_counter()
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        code: int | None = out.returncode
        stdout, stderr = out.stdout, out.stderr
    except subprocess.TimeoutExpired as e:
        code = None
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    return Result(script.name, argv, code, stdout, stderr, time.perf_counter() - t0, before, load_average())


def _display_command(argv: list[str], script: Path) -> str:
    try:
        shown = script.resolve().relative_to(ROOT)
    except ValueError:
        shown = script
    return " ".join([".venv/bin/python", str(shown), *argv[2:]])


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in ``text`` so the output stays verbatim."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def section(result: Result, script: Path, machine: str) -> str:
    lines = [
        f"## {result.script}",
        "",
        f"Command: `{_display_command(result.argv, script)}`",
        "",
        f"Machine: {machine}; load average (1/5/15 min) {result.load_before} before, {result.load_after} "
        f"after this script; it ran {result.seconds:.0f} s.",
        "",
    ]
    if result.returncode is None:
        lines += [
            f"**FAILED: timed out after {result.seconds:.0f} s.** Its output so far and the end of "
            "its stderr are below; rerun the command above to see the whole run.",
            "",
        ]
    elif result.returncode != 0:
        lines += [
            f"**FAILED: exit status {result.returncode}.** The end of its stderr is below; "
            "rerun the command above to see the whole run.",
            "",
        ]
    out = result.stdout if result.stdout.endswith("\n") or not result.stdout else result.stdout + "\n"
    fence = _fence(out)
    lines += [f"{fence}text", out.rstrip("\n") if out else "(no output)", fence, ""]
    if result.returncode != 0:
        tail = "\n".join(result.stderr.rstrip("\n").splitlines()[-STDERR_TAIL:]) or "(empty)"
        fence = _fence(tail)
        lines += ["stderr (end):", "", f"{fence}text", tail, fence, ""]
    return "\n".join(lines)


def render(results: list[tuple[Result, Path]], machine: str, when: str) -> str:
    failed = [r.script for r, _ in results if r.returncode != 0]
    head = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/_report.py; do not edit by hand. -->",
        "",
        "`make bench` regenerates this page: it runs every `benchmarks/bench_*.py` script and copies its "
        "output here verbatim. Every figure is a ratio of things measured side by side in the same run "
        "on the machine described, so it says how the alternatives compare there, not how fast any "
        "other device is. Reproduce one section with its command.",
        "",
        f"Run: {when}. Machine: {machine}; load average {load_average()} (1/5/15 min) when the page was written.",
        "",
        f"Scripts: {len(results)}, failed: {len(failed)}" + (f" ({', '.join(failed)})." if failed else "."),
        "",
    ]
    return "\n".join(head + [section(r, p, machine) for r, p in results]).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmarks", type=Path, default=ROOT / "benchmarks", help="directory of bench_*.py scripts")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="page to write")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the scripts")
    ap.add_argument("--full", action="store_true", help="never pass --quick (the scripts' default sizes)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before a script is stopped")
    ap.add_argument("--bandwidth-seconds", type=float, default=0.5, help="length of the bandwidth measurement")
    args = ap.parse_args(argv)

    scripts = sorted(args.benchmarks.glob("bench_*.py"))
    if not scripts:
        print(f"no bench_*.py script in {args.benchmarks}: pass --benchmarks DIR", file=sys.stderr)
        return 2
    machine = machine_line(args.bandwidth_seconds)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = []
    for script in scripts:
        print(f"== {script.name}", file=sys.stderr, flush=True)
        result = run_script(args.python, script, args.full, args.timeout)
        if result.returncode != 0:
            print(f"   failed ({'timeout' if result.returncode is None else result.returncode})", file=sys.stderr)
        results.append((result, script))

    from edgellm._fs import atomic_write

    atomic_write(args.out, render(results, machine, when).encode())
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if any(r.returncode != 0 for r, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())

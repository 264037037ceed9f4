"""The machine this runs on, described as a hardware profile (``edgellm profiles detect``):
CPU, ISA features, RAM, the runtimes installed, and a measured memory bandwidth.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import platform
import time
from collections.abc import Iterable
from pathlib import Path

from edgellm.errors import ProfileError
from edgellm.formats import RUNTIME_NAMES
from edgellm.profiles import ARCHES, GIB, SCHEMA_VERSION, Profile

log = logging.getLogger(__name__)

#: artifact kind -> the module whose presence means its runtime is installed
_RUNTIME_MODULES = {"gguf": "llama_cpp", "onnx": "onnxruntime"}


_X86_FLAGS = {"sse4_2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
              "avx512f": "avx512f", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni"}
_ARM_FEATURES = {"asimd": "neon", "neon": "neon", "asimddp": "dotprod", "i8mm": "i8mm",
                 "sve": "sve", "sve2": "sve2"}


def isa_from_cpu_flags(arch: str, flags: Iterable[str]) -> frozenset[str]:
    """Map /proc/cpuinfo ``flags`` (x86) or ``Features`` (Arm) to the known ISA names."""
    table = _X86_FLAGS if arch in ("x86_64", "i686") else _ARM_FEATURES
    return frozenset(table[f] for f in flags if f in table)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _cpuinfo_first(text: str, *keys: str) -> str:
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k.strip() in keys and v.strip():
            return v.strip()
    return ""


def _mem_total_bytes() -> int:
    for line in _read_text("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    try:  # non-Linux fallback
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _mem_available_bytes() -> int:
    for line in _read_text("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return _mem_total_bytes() // 2


def measure_bandwidth_gbps(seconds: float = 0.5, buffer_mb: int = 128, threads: int = 1) -> float:
    """Sustained memory bandwidth in GB/s, measured with a numpy copy (STREAM-copy style).

    Copies a ``buffer_mb`` MiB array into another repeatedly for about ``seconds`` (allocation
    included; at least 3 passes) and counts
    read + write bytes of the best pass. ``threads`` > 1 copies disjoint slices in parallel threads
    (numpy releases the GIL while copying); one thread gives a single-core figure, which is lower
    than what a multi-threaded decoder reaches on many-core parts. The buffer is capped at 1/8 of
    the available RAM so this is safe on small boards.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    deadline = time.perf_counter() + max(seconds, 0.05)
    nbytes = min(buffer_mb * 1024 * 1024, max(_mem_available_bytes() // 8, 8 * 1024 * 1024))
    n = nbytes // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    threads = max(1, int(threads))
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def copy_slice(b: tuple[int, int]) -> None:
        np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]])

    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        np.copyto(dst, src)  # fault the pages in
        best = math.inf
        passes = 0
        while passes < 3 or (time.perf_counter() < deadline and passes < 200):
            t0 = time.perf_counter()
            if pool is None:
                np.copyto(dst, src)
            else:
                list(pool.map(copy_slice, bounds))
            best = min(best, time.perf_counter() - t0)
            passes += 1
    finally:
        if pool is not None:
            pool.shutdown()
    gbps = 2 * n * 8 / best / 1e9
    log.debug("bandwidth: %.2f GB/s (%d MiB buffer, %d threads, %d passes)", gbps, nbytes >> 20, threads, passes)
    return gbps


def _detect_device_class(arch: str, ram_bytes: int, flags: list[str]) -> str:
    if os.path.exists("/etc/nv_tegra_release"):
        return "jetson"
    if arch in ("aarch64", "armv7l", "riscv64"):
        return "sbc"
    if any(Path("/sys/class/power_supply").glob("BAT*")):
        return "laptop"
    if "hypervisor" in flags:
        return "server"  # a VM: most likely a cloud or CI machine
    return "server" if ram_bytes > 32 * GIB or (os.cpu_count() or 1) > 8 else "mini-pc"


def detect(measure_bandwidth: bool = True, name: str = "detected",
           device_class: str | None = None, bandwidth_seconds: float = 0.5) -> Profile:
    """A profile describing this machine: cores, RAM, ISA flags, runtimes and (optionally) a
    measured memory bandwidth. Targets and power budget are defaults to be edited.

    Without ``measure_bandwidth`` the bandwidth is a placeholder of 1.0 GB/s (edit it).
    """
    arch = platform.machine().lower() or "unknown"
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    if arch not in ARCHES:
        raise ProfileError(f"detect: unsupported architecture {arch!r}; known: {sorted(ARCHES)}",
                           hint="write the profile by hand; see docs/profiles.md")
    cpuinfo = _read_text("/proc/cpuinfo")
    flags = _cpuinfo_first(cpuinfo, "flags", "Features").split()
    isa = isa_from_cpu_flags(arch, flags)
    cpu_model = (_cpuinfo_first(cpuinfo, "model name", "Model", "Hardware")
                 or _read_text("/proc/device-tree/model").strip("\x00\n ")
                 or platform.processor() or arch)
    cores = os.cpu_count() or 1
    khz = _read_text("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").strip()
    if khz.isdigit() and int(khz) > 0:
        freq = round(int(khz) / 1e6, 2)
    else:
        mhz = _cpuinfo_first(cpuinfo, "cpu MHz")
        try:
            freq = round(float(mhz) / 1000, 2)
        except ValueError:
            freq = 1.0
    ram_bytes = _mem_total_bytes()
    if ram_bytes <= 0:
        raise ProfileError("detect: cannot read the total RAM (/proc/meminfo)",
                           hint="write the profile by hand; see docs/profiles.md")
    threads = min(cores, 4)
    if measure_bandwidth:
        bandwidth = round(measure_bandwidth_gbps(seconds=bandwidth_seconds, threads=threads), 2)
    else:
        bandwidth = 1.0
    runtimes = [RUNTIME_NAMES[kind] for kind, module in _RUNTIME_MODULES.items()
                if importlib.util.find_spec(module) is not None]
    display = cpu_model if len(cpu_model) < 60 else cpu_model[:57] + "..."
    data = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "display_name": f"This machine ({display}, {ram_bytes / GIB:.1f} GiB)",
        "device_class": device_class or _detect_device_class(arch, ram_bytes, flags),
        "arch": arch,
        "sources": ["file:///proc/cpuinfo", "file:///proc/meminfo"],
        "memory": {"ram_gb": round(ram_bytes / GIB, 2), "model_share": 0.5, "bandwidth_gbps": bandwidth},
        "cpu": {"model": cpu_model, "cores": cores, "freq_ghz": freq, "isa": sorted(isa)},
        "runtimes": {"available": runtimes, "threads": threads},
        "targets": {"min_tokens_per_second": 10.0, "max_first_token_ms": 1000, "context_length": 2048},
        "power": {"budget_w": 65.0 if arch == "x86_64" else 15.0},
    }
    return Profile.from_dict(data, file="<detected>")

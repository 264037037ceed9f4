"""The machine this runs on, described as a hardware profile (``edgellm profiles detect``):
CPU, ISA features, RAM, the runtimes installed, and a measured memory bandwidth.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgellm.errors import ProfileError
from edgellm.formats import RUNTIME_NAMES
from edgellm.profiles import ARCHES, GIB, SCHEMA_VERSION, Profile

log = logging.getLogger(__name__)

#: artifact kind -> the module whose presence means its runtime is installed
_RUNTIME_MODULES = {"gguf": "llama_cpp", "onnx": "onnxruntime"}


_X86_FLAGS = {
    "sse4_2": "sse4_2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
}
_ARM_FEATURES = {"asimd": "neon", "neon": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2"}


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


#: what a sample times: ``read`` streams the buffer once (a decode step streams its weights: the
#: roofline), ``copy`` is a STREAM-style copy with read + write bytes counted
BANDWIDTH_KINDS = ("read", "copy")


@dataclasses.dataclass(frozen=True)
class Bandwidth:
    """Several bandwidth samples (GB/s) of one buffer size: use the median, report the spread."""

    samples: tuple[float, ...]
    buffer_mb: int
    threads: int
    cpu_samples: tuple[float, ...] = ()  # the same passes timed in CPU seconds (immune to time-slicing)
    kind: str = "read"

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    @property
    def spread(self) -> float:
        """(max - min) / median: 0.1 means the samples lie within 10% of each other."""
        return (max(self.samples) - min(self.samples)) / self.median if self.median > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        method = {
            "read": "numpy integer reduction streaming the buffer once (bytes read), median pass per sample",
            "copy": "numpy copy, read + write bytes, median pass per sample",
        }[self.kind]
        return {
            "median_gbps": round(self.median, 3),
            "min_gbps": round(min(self.samples), 3),
            "max_gbps": round(max(self.samples), 3),
            "spread": round(self.spread, 3),
            "samples_gbps": [round(x, 3) for x in self.samples],
            "buffer_mb": self.buffer_mb,
            "threads": self.threads,
            "kind": self.kind,
            "method": method,
            **({"cpu_median_gbps": round(float(statistics.median(self.cpu_samples)), 3)} if self.cpu_samples else {}),
        }


class BandwidthMeter:
    """Holds its buffer(s) so samples can be taken between other measurements (interleaved).

    ``kind="read"`` (the default) times one pass reading the whole buffer, as a decode step reads
    its weights: that is the roofline a decode is compared with. ``kind="copy"`` times a copy and
    counts read + write bytes (STREAM copy); on the machines measured here it reads 10-15% lower
    than a read pass, so a decode compared with it could show an "efficiency" above 1.

    Each :meth:`sample` times ``passes`` passes and keeps the median pass; a sample is one figure,
    :meth:`result` the median over all samples taken. The buffer is capped at 1/8 of the available
    RAM. Choose it larger than the last-level cache (or as large as the model the figure is
    compared with): a buffer that fits in a large L3 measures the cache, not memory, which is how
    one build read 10 GB/s and the next 38 GB/s."""

    def __init__(self, buffer_mb: int = 256, threads: int = 1, kind: str = "read") -> None:
        import numpy as np

        if kind not in BANDWIDTH_KINDS:
            raise ValueError(f"bandwidth kind {kind!r}: use one of {', '.join(BANDWIDTH_KINDS)}")
        nbytes = min(buffer_mb * 1024 * 1024, max(_mem_available_bytes() // 8, 8 * 1024 * 1024))
        self.kind = kind
        self.n = nbytes // 8
        self.buffer_mb = nbytes >> 20
        self.threads = max(1, int(threads))
        self._src = np.ones(self.n, dtype=np.int64)
        self._dst = np.empty_like(self._src) if kind == "copy" else None
        self._pass_on(0, self.n)  # fault the pages in
        self.samples: list[float] = []
        self.cpu_samples: list[float] = []

    @property
    def _bytes_per_pass(self) -> int:
        return (2 if self.kind == "copy" else 1) * self.n * 8

    def _pass_on(self, lo: int, hi: int) -> None:
        import numpy as np

        if self._dst is not None:
            np.copyto(self._dst[lo:hi], self._src[lo:hi])
        else:
            np.bitwise_or.reduce(self._src[lo:hi])  # vectorized, memory-bound, releases the GIL

    def _pass(self) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        if self.threads == 1:
            self._pass_on(0, self.n)
        else:
            from concurrent.futures import ThreadPoolExecutor

            n, k = self.n, self.threads
            bounds = [(i * n // k, (i + 1) * n // k) for i in range(k)]
            with ThreadPoolExecutor(k) as pool:  # numpy releases the GIL in both passes
                list(pool.map(lambda b: self._pass_on(*b), bounds))
        return time.perf_counter() - t0, time.process_time() - c0

    def sample(self, passes: int = 3) -> float:
        """One sample in GB/s of wall time; the same passes in CPU time go to :attr:`cpu_samples`."""
        runs = [self._pass() for _ in range(max(1, passes))]
        gbps = self._bytes_per_pass / statistics.median(r[0] for r in runs) / 1e9
        cpu = statistics.median(r[1] for r in runs)
        self.samples.append(gbps)
        self.cpu_samples.append(self._bytes_per_pass / cpu / 1e9 if cpu > 0 else gbps)
        return gbps

    def result(self) -> Bandwidth:
        if not self.samples:
            self.sample()
        return Bandwidth(tuple(self.samples), self.buffer_mb, self.threads, tuple(self.cpu_samples), self.kind)


def measure_bandwidth(samples: int = 5, buffer_mb: int = 256, threads: int = 1, passes: int = 3) -> Bandwidth:
    """Sustained memory read bandwidth: ``samples`` samples, each the median of ``passes`` passes
    reading a ``buffer_mb`` buffer; see :class:`BandwidthMeter`."""
    meter = BandwidthMeter(buffer_mb, threads)
    for _ in range(max(1, samples)):
        meter.sample(passes)
    res = meter.result()
    log.debug("bandwidth: %s", res.to_dict())
    return res


def measure_bandwidth_gbps(seconds: float = 0.5, buffer_mb: int = 256, threads: int = 1) -> float:
    """The median of :func:`measure_bandwidth` (samples spread over about ``seconds``), in GB/s.

    ``threads`` > 1 copies disjoint slices in parallel threads; one thread gives a single-core
    figure, lower than what a multi-threaded decoder reaches on many-core parts."""
    meter = BandwidthMeter(buffer_mb, threads)
    deadline = time.perf_counter() + max(seconds, 0.05)
    while len(meter.samples) < 3 or (time.perf_counter() < deadline and len(meter.samples) < 50):
        meter.sample(passes=1)
    return meter.result().median


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


def detect(
    measure_bandwidth: bool = True,
    name: str = "detected",
    device_class: str | None = None,
    bandwidth_seconds: float = 0.5,
) -> Profile:
    """A profile describing this machine: cores, RAM, ISA flags, runtimes and (optionally) a
    measured memory bandwidth. Targets and power budget are defaults to be edited.

    Without ``measure_bandwidth`` the bandwidth is a placeholder of 1.0 GB/s (edit it).
    """
    arch = platform.machine().lower() or "unknown"
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    if arch not in ARCHES:
        raise ProfileError(
            f"detect: unsupported architecture {arch!r}; known: {sorted(ARCHES)}",
            hint="write the profile by hand; see docs/profiles.md",
        )
    cpuinfo = _read_text("/proc/cpuinfo")
    flags = _cpuinfo_first(cpuinfo, "flags", "Features").split()
    isa = isa_from_cpu_flags(arch, flags)
    cpu_model = (
        _cpuinfo_first(cpuinfo, "model name", "Model", "Hardware")
        or _read_text("/proc/device-tree/model").strip("\x00\n ")
        or platform.processor()
        or arch
    )
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
        raise ProfileError(
            "detect: cannot read the total RAM (/proc/meminfo)", hint="write the profile by hand; see docs/profiles.md"
        )
    threads = min(cores, 4)
    if measure_bandwidth:
        bandwidth = round(measure_bandwidth_gbps(seconds=bandwidth_seconds, threads=threads), 2)
    else:
        bandwidth = 1.0
    runtimes = [
        RUNTIME_NAMES[kind] for kind, module in _RUNTIME_MODULES.items() if importlib.util.find_spec(module) is not None
    ]
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

"""How a runtime is run on a device: threads, flash attention, KV-cache type, batch sizes, mmap.

One record, :class:`RuntimeSettings`, travels from the build to the device:

1. the build picks it per profile (:func:`for_profile`) and writes it into the bundle manifest
   (``runtime_settings``);
2. the agent reads it back from the verified manifest (:func:`from_manifest`, every field typed
   and bounded), lets its own config override the thread count (``edgellm-agent provision
   --threads N``) and never uses more threads than the CPUs it may run on;
3. :func:`edgellm.runtime.load_runtime` hands it to llama.cpp or onnxruntime.

The defaults are measured (``python benchmarks/bench_decode_settings.py``, figures in
docs/speed.md): flash attention on and an F16 KV cache, batch = ubatch = 256, and one thread per
core the profile lists. llama.cpp's worker threads busy-wait between graph nodes, so a thread
count above the cores actually free slows every token down (measured: 4-25x); hence the cap at
the CPUs this process may use, less one from four CPUs up (:func:`thread_cap`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from edgellm.errors import EdgeLLMError

#: KV-cache element types the agent accepts (llama.cpp names); quantized V needs flash attention
KV_CACHE_TYPES = ("f16", "f32", "q8_0")
MAX_THREADS = 256
MAX_BATCH = 8192
MANIFEST_KEY = "runtime_settings"


class RuntimeSettingsError(EdgeLLMError):
    """A runtime-settings field is missing its type or bounds."""


@dataclasses.dataclass(frozen=True)
class RuntimeSettings:
    threads: int = 1
    flash_attn: bool = True
    kv_cache_type: str = "f16"
    batch_size: int = 256
    ubatch_size: int = 256
    mmap: bool | None = None  # None: llama.cpp runtime decides (off for repacked weight types)

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> RuntimeSettingsError:
            return RuntimeSettingsError(
                f"runtime_settings.{field}: {why}", hint="rebuild the bundle, or fix the value in the agent config"
            )

        for field, hi in (("threads", MAX_THREADS), ("batch_size", MAX_BATCH), ("ubatch_size", MAX_BATCH)):
            v = getattr(self, field)
            if type(v) is not int or not 1 <= v <= hi:
                raise bad(field, f"must be an integer in 1..{hi}, got {v!r}")
        if self.ubatch_size > self.batch_size:
            raise bad("ubatch_size", f"{self.ubatch_size} exceeds batch_size {self.batch_size}")
        if type(self.flash_attn) is not bool:
            raise bad("flash_attn", f"must be true or false, got {self.flash_attn!r}")
        if self.mmap is not None and type(self.mmap) is not bool:
            raise bad("mmap", f"must be true, false or null, got {self.mmap!r}")
        if self.kv_cache_type not in KV_CACHE_TYPES:
            raise bad("kv_cache_type", f"must be one of {', '.join(KV_CACHE_TYPES)}, got {self.kv_cache_type!r}")
        if self.kv_cache_type == "q8_0" and not self.flash_attn:
            raise bad("kv_cache_type", "a q8_0 KV cache needs flash_attn = true in llama.cpp")

    @classmethod
    def from_dict(cls, d: Any) -> RuntimeSettings:
        if not isinstance(d, Mapping):
            raise RuntimeSettingsError(
                f"runtime_settings: expected an object, got {type(d).__name__}", hint="rebuild the bundle"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})  # unknown (newer) fields are ignored

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_threads(self, threads: int) -> RuntimeSettings:
        return dataclasses.replace(self, threads=threads)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def for_profile(profile: Any, runtime: str = "gguf") -> RuntimeSettings:
    """The measured defaults for a device class: one thread per core the profile runs on."""
    threads = max(1, min(int(getattr(profile, "threads", 1) or 1), MAX_THREADS))
    return RuntimeSettings(threads=threads)


def from_manifest(manifest: Any) -> RuntimeSettings:
    """The settings a verified manifest carries; older bundles give ``generation.threads`` only."""
    extra = getattr(manifest, "extra", None) or {}
    if MANIFEST_KEY in extra:
        return RuntimeSettings.from_dict(extra[MANIFEST_KEY])
    threads = (getattr(manifest, "generation", None) or {}).get("threads", 1)
    return RuntimeSettings(threads=threads if type(threads) is int and 1 <= threads <= MAX_THREADS else 1)


def resolve(manifest: Any, threads_override: int | None = None, *, cpus: int | None = None) -> RuntimeSettings:
    """What the device runs: the manifest's settings with its thread count capped by
    :func:`thread_cap` of ``cpus`` (default: :func:`usable_cpus`), or the config's thread count
    when one is set."""
    s = from_manifest(manifest)
    if threads_override is not None:  # the operator's explicit choice is honoured as given
        return s.with_threads(int(threads_override))
    return s.with_threads(max(1, min(s.threads, thread_cap(cpus or usable_cpus()))))


def thread_cap(cpus: int) -> int:
    """The most threads the agent gives llama.cpp on its own: every CPU on 1-3 CPU devices, one CPU
    left free from 4 up. Measured (docs/speed.md): a spinning llama.cpp thread whose core is taken
    by other work slows every token by 4-25x, while decode is memory-bound, so the last core of
    four or more adds little."""
    return cpus - 1 if cpus >= 4 else cpus

"""LoRA adapters on a loaded llama.cpp model: several adapters, one base, no reload.

    adapters = LoraAdapters(runtime)                      # a LlamaCppRuntime
    adapters.load("kitchen", "adapter.gguf", sha256=..., size=...)
    adapters.activate("kitchen")                          # base + kitchen on the context
    adapters.activate(None)                               # the base alone again
    adapters.unload("kitchen")

llama.cpp applies an adapter to a context (``llama_set_adapters_lora``) without touching the
model's weights, so switching costs nothing but the KV cache of the previous prompt (computed
with other weights, it is dropped). Before llama.cpp reads an adapter file, its size and sha256
are checked against the verified manifest and :func:`check_lora_gguf` validates its metadata and
tensor table against the base (names, shapes, rank) with gguf-py's pure-Python reader.
Not thread-safe, like the runtime it belongs to: call it from the thread that generates.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Any

from edgellm.runtime.base import ModelLoadError
from edgellm.runtime.base import runtime_error as _err
from edgellm.runtime.gguf_check import GGUFInfo, _bad, _expected_tensors, _Fields, open_gguf, verify_file

MAX_RANK = 1024
_NAME = re.compile(r"^(blk\.\d{1,4}\.[a-z_]+\.weight)\.lora_(a|b)$")


def check_lora_gguf(path: str | Path, base: GGUFInfo) -> dict[str, Any]:
    """Validate a LoRA adapter GGUF against the base it is meant for; returns rank, alpha, tensor count."""
    path = Path(path)
    reader, size = open_gguf(path)
    f = _Fields(reader, path)
    if f.val("general.type") != "adapter" or f.val("adapter.type") != "lora":
        raise _bad(path, "not a LoRA adapter (general.type must be 'adapter', adapter.type 'lora')")
    if f.val("general.architecture") != base.architecture:
        raise _bad(
            path,
            f"adapter architecture {f.val('general.architecture')!r} differs from the base's {base.architecture!r}",
        )
    alpha = float(f.val("adapter.lora.alpha", 0.0))
    if not 0.0 <= alpha <= 1e6:
        raise _bad(path, f"adapter.lora.alpha={alpha!r} is out of range")
    hp = {
        k: getattr(base, k)
        for k in (
            "architecture",
            "block_count",
            "embedding_length",
            "feed_forward_length",
            "head_count",
            "head_count_kv",
            "head_dim",
        )
    }
    expected, _ = _expected_tensors(hp, base.vocab_size)
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for t in reader.tensors:
        m = _NAME.match(t.name)
        want = expected.get(m.group(1)) if m else None
        if m is None or want is None or len(want) != 2:
            raise _bad(path, f"tensor {t.name!r} patches nothing in the base model")
        if t.data_offset + t.n_bytes > size:
            raise _bad(path, f"tensor {t.name} extends past the end of the file (truncated?)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = tuple(int(x) for x in t.shape)
    ranks = set()
    for name, ab in pairs.items():
        want = expected[name]
        a, b = ab.get("a"), ab.get("b")
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            raise _bad(path, f"{name}: lora_a and lora_b must both be present and 2-D")
        if a[0] != want[0] or b[1] != want[1] or a[1] != b[0] or not 1 <= a[1] <= MAX_RANK:
            raise _bad(path, f"{name}: lora_a {a} / lora_b {b} do not fit the base tensor {want}")
        ranks.add(a[1])
    if not pairs:
        raise _bad(path, "the adapter has no tensors")
    return {"rank": max(ranks), "alpha": alpha, "tensors": 2 * len(pairs), "size_bytes": size}


class LoraAdapters:
    """The adapters loaded on one :class:`~edgellm.runtime.llamacpp.LlamaCppRuntime`; one active at a time."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self._llama_cpp = runtime._llama_cpp
        self._loaded: dict[str, Any] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.active: str | None = None

    def __contains__(self, name: object) -> bool:
        return name in self._loaded

    @property
    def names(self) -> list[str]:
        return sorted(self._loaded)

    def load(
        self, name: str, path: str | Path, *, sha256: str | None = None, size: int | None = None, scale: float = 1.0
    ) -> dict[str, Any]:
        """Verify, validate and load an adapter file under ``name`` (replacing one of that name)."""
        path = Path(path)
        if not path.is_file():
            raise _err(ModelLoadError, f"{path} does not exist", "reinstall the adapter bundle")
        if sha256 is not None or size is not None:
            verify_file(path, sha256=sha256, size=size)
        info = check_lora_gguf(path, self.runtime.info)
        ptr = self._llama_cpp.llama_adapter_lora_init(self.runtime._llm.model, str(path).encode())
        if not ptr:
            raise _err(
                ModelLoadError,
                f"llama.cpp refused the adapter {path.name}",
                "the adapter was made for another base model: rebuild it on this base",
            )
        if name in self._loaded:
            self.unload(name)
        self._loaded[name] = (ptr, float(scale))
        self.info[name] = info
        return info

    def activate(self, name: str | None) -> None:
        """Serve the base with adapter ``name`` (None: the base alone). A no-op if already so."""
        if name == self.active:
            return
        lc = self._llama_cpp
        ctx = self.runtime._llm.ctx
        if name is None:
            rc = lc.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            if name not in self._loaded:
                raise _err(ModelLoadError, f"adapter {name!r} is not loaded", "install the adapter bundle first")
            ptr, scale = self._loaded[name]
            rc = lc.llama_set_adapters_lora(
                ctx, (lc.llama_adapter_lora_p_ctypes * 1)(ptr), 1, (ctypes.c_float * 1)(scale)
            )
        if rc != 0:
            raise _err(
                ModelLoadError, f"llama.cpp could not switch to adapter {name!r} (code {rc})", "reload the model"
            )
        self.runtime._cached = []  # the cached prefix was computed with other weights
        self.active = name

    def unload(self, name: str) -> None:
        if name not in self._loaded:
            return
        if self.active == name:
            self.activate(None)
        ptr, _ = self._loaded.pop(name)
        self.info.pop(name, None)
        self._llama_cpp.llama_adapter_lora_free(ptr)

"""Quantize a GGUF with llama.cpp's own quantizer and report what each tensor became.

llama.cpp silently falls back when a tensor's shape does not fit a quantization type
(K-quants need an input dimension that is a multiple of 256; Q4_0/Q8_0 a multiple of 32) and
still returns success, so the types are read back with ``gguf.GGUFReader`` and every tensor that
is not in the requested type is reported with the reason.
"""

from __future__ import annotations

import ctypes
import logging
from collections import Counter
from pathlib import Path

from edgellm.errors import BuildError

log = logging.getLogger(__name__)

#: ftype name -> the tensor types a 2-D weight is expected to get
_EXPECTED: dict[str, frozenset[str]] = {
    "F32": frozenset({"F32"}),
    "F16": frozenset({"F16"}),
    "Q8_0": frozenset({"Q8_0"}),
    "Q6_K": frozenset({"Q6_K"}),
    "Q5_K_M": frozenset({"Q5_K", "Q6_K"}),  # _M mixes: some attn_v/ffn_down in Q6_K
    "Q4_K_M": frozenset({"Q4_K", "Q6_K"}),
    "Q4_0": frozenset({"Q4_0"}),
}
_MAIN = {"Q5_K_M": "Q5_K", "Q4_K_M": "Q4_K"}
_OUTPUT_NAMES = ("output.weight", "token_embd.weight")


def quantize(src: str | Path, dst: str | Path, ftype: int, *, nthread: int = 1) -> None:
    """Run ``llama_model_quantize`` (src must be a GGUF we wrote ourselves: it is trusted)."""
    from edgellm.runtime.llamacpp import import_llama_cpp

    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = max(1, int(nthread))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise BuildError(
            f"llama.cpp quantizer failed with code {rc} for ftype {ftype}",
            hint="run with -vv to see llama.cpp's log; check the source GGUF loads",
        )


def tensor_report(path: str | Path, ftype_name: str) -> dict:
    """Per-tensor types of ``path`` and the fallbacks against what ``ftype_name`` asks for."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    expected = _EXPECTED[ftype_name]
    main = _MAIN.get(ftype_name, ftype_name)
    tensors, fallbacks = [], []
    for t in reader.tensors:
        ttype = t.tensor_type.name
        shape = [int(x) for x in t.shape]  # ggml order: ne0 (input dim) first
        tensors.append({"name": t.name, "type": ttype, "shape": shape, "bytes": int(t.n_bytes)})
        if len(shape) < 2 or ttype in expected:
            continue
        if ftype_name not in ("F32", "F16") and t.name in _OUTPUT_NAMES and ttype in ("Q6_K", "Q8_0"):
            continue  # llama.cpp keeps the output projection at higher precision by design
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[main]][0]
        if shape[0] % block:
            reason = f"input dimension {shape[0]} is not a multiple of {block} ({main} block size)"
        else:
            reason = "llama.cpp's quantizer chose another type"
        fallbacks.append({"tensor": t.name, "type": ttype, "expected": main, "reason": reason})
    counts = Counter(t["type"] for t in tensors)
    return {
        "ftype": ftype_name,
        "tensors": tensors,
        "type_counts": dict(sorted(counts.items())),
        "fallbacks": fallbacks,
    }

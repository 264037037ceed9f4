"""Model formats, named once: artifact kinds (the runtimes that load them) and build candidates.

- :data:`RUNTIMES`: artifact kinds, also a bundle manifest's ``runtime`` and a Runtime's ``kind``;
- :data:`RUNTIME_NAMES`: kind -> the runtime's name in hardware profiles (``runtimes.available``);
- :data:`ONNX_FORMATS`, :data:`GGUF_FORMATS`, :data:`ALL_FORMATS`: the candidate formats
  ``edgellm build`` considers, each ``<kind>-<variant>``.

No imports beyond the standard library: the agent, the server and the pipeline all read it.
"""

from __future__ import annotations

ONNX = "onnx"
GGUF = "gguf"
#: artifact kinds, in preference order for display
RUNTIMES: tuple[str, ...] = (ONNX, GGUF)
#: artifact kind -> runtime name used in hardware profiles
RUNTIME_NAMES: dict[str, str] = {ONNX: "onnxruntime", GGUF: "llama.cpp"}
#: the runtime names a hardware profile may list
KNOWN_RUNTIME_NAMES: frozenset[str] = frozenset(RUNTIME_NAMES.values())

ONNX_FORMATS: tuple[str, ...] = ("onnx-fp32", "onnx-int8")
GGUF_FORMATS: tuple[str, ...] = ("gguf-f16", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k_m", "gguf-q4_k_m", "gguf-q4_0")
ALL_FORMATS: tuple[str, ...] = ONNX_FORMATS + GGUF_FORMATS


def format_kind(fmt: str) -> str | None:
    """The artifact kind of candidate format ``fmt`` (``"gguf-q8_0"`` -> ``"gguf"``), None if unknown."""
    kind = fmt.split("-", 1)[0]
    return kind if kind in RUNTIMES and fmt in ALL_FORMATS else None

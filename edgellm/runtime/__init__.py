"""Inference runtimes behind one interface (see :mod:`edgellm.runtime.base`)."""

from __future__ import annotations

from pathlib import Path

from edgellm.formats import GGUF, ONNX, RUNTIMES
from edgellm.runtime.base import (
    Completion,
    GenerationError,
    GenerationParams,
    ModelLoadError,
    PromptTooLongError,
    Runtime,
    RuntimeFailure,
    TokenEvent,
    render_chat,
)

__all__ = [
    "Completion",
    "GenerationError",
    "GenerationParams",
    "ModelLoadError",
    "PromptTooLongError",
    "RUNTIMES",
    "Runtime",
    "RuntimeFailure",
    "TokenEvent",
    "load_runtime",
    "render_chat",
]


def load_runtime(kind: str, artifact: str | Path, *, model_dir: str | Path | None = None,
                 threads: int = 1, context_length: int | None = None) -> Runtime:
    """Load ``artifact`` with the backend for ``kind`` (one of :data:`edgellm.formats.RUNTIMES`).

    ``model_dir`` holds ``tokenizer.json``/``generation_config.json`` (for ONNX; GGUF carries
    its tokenizer). Backends are imported here, lazily.
    """
    if kind == ONNX:
        from edgellm.runtime.onnx import OnnxRuntime

        return OnnxRuntime.load(artifact, model_dir=model_dir, threads=threads, context_length=context_length)
    if kind == GGUF:
        from edgellm.runtime.llamacpp import LlamaCppRuntime

        return LlamaCppRuntime.load(artifact, threads=threads, context_length=context_length)
    raise ModelLoadError(f"unknown runtime {kind!r}", hint=f"use one of {', '.join(RUNTIMES)}")

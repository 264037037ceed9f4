"""Inference runtimes behind one interface (see :mod:`edgellm.runtime.base`)."""

from __future__ import annotations

from pathlib import Path

from edgellm.runtime.base import (
    Completion,
    GenerationError,
    GenerationParams,
    ModelLoadError,
    PromptTooLongError,
    Runtime,
    RuntimeError_,
    TokenEvent,
    render_chat,
)

__all__ = [
    "Completion",
    "GenerationError",
    "GenerationParams",
    "ModelLoadError",
    "PromptTooLongError",
    "Runtime",
    "RuntimeError_",
    "TokenEvent",
    "load_runtime",
    "render_chat",
]


def load_runtime(kind: str, artifact: str | Path, *, model_dir: str | Path | None = None,
                 threads: int = 1, context_length: int | None = None) -> Runtime:
    """Load ``artifact`` with the backend for ``kind`` ("onnx" or "gguf").

    ``model_dir`` holds ``tokenizer.json``/``generation_config.json`` (for ONNX; GGUF carries
    its tokenizer). Backends are imported here, lazily.
    """
    if kind == "onnx":
        from edgellm.runtime.onnx import OnnxRuntime

        return OnnxRuntime.load(artifact, model_dir=model_dir, threads=threads, context_length=context_length)
    if kind == "gguf":
        from edgellm.runtime.llamacpp import LlamaCppRuntime

        return LlamaCppRuntime.load(artifact, threads=threads, context_length=context_length)
    raise ModelLoadError(f"unknown runtime {kind!r}: expected 'onnx' or 'gguf'")

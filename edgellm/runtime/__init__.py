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
from edgellm.runtime.settings import RuntimeSettings

__all__ = [
    "Completion",
    "GenerationError",
    "GenerationParams",
    "ModelLoadError",
    "PromptTooLongError",
    "RUNTIMES",
    "Runtime",
    "RuntimeFailure",
    "RuntimeSettings",
    "TokenEvent",
    "load_runtime",
    "render_chat",
]


def load_runtime(
    kind: str,
    artifact: str | Path,
    *,
    model_dir: str | Path | None = None,
    threads: int = 1,
    context_length: int | None = None,
    settings: RuntimeSettings | None = None,
) -> Runtime:
    """Load ``artifact`` with the backend for ``kind`` (one of :data:`edgellm.formats.RUNTIMES`).

    ``model_dir`` holds ``tokenizer.json``/``generation_config.json`` (for ONNX; GGUF carries
    its tokenizer). ``settings`` (threads, flash attention, KV type, batch sizes, mmap; see
    :mod:`edgellm.runtime.settings`) replaces ``threads`` when given. Backends are imported here, lazily.
    """
    if settings is not None:
        threads = settings.threads
    if kind == ONNX:
        from edgellm.runtime.onnx import OnnxRuntime

        return OnnxRuntime.load(artifact, model_dir=model_dir, threads=threads, context_length=context_length)
    if kind == GGUF:
        from edgellm.runtime.llamacpp import LlamaCppRuntime

        if settings is None:
            return LlamaCppRuntime.load(artifact, threads=threads, context_length=context_length)
        return LlamaCppRuntime.load(
            artifact,
            threads=threads,
            context_length=context_length,
            flash_attn=settings.flash_attn,
            kv_cache_type=settings.kv_cache_type,
            batch_size=settings.batch_size,
            ubatch_size=settings.ubatch_size,
            mmap=settings.mmap,
        )
    raise ModelLoadError(f"unknown runtime {kind!r}", hint=f"use one of {', '.join(RUNTIMES)}")

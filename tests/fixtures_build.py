"""Fixtures (see conftest.py): tiny trained models and ONNX exports (build pipeline I).

``tiny_model_dir``  a Hugging Face-format model dir: the ``tiny`` preset trained briefly on the
                    embedded corpus (config.json, model.safetensors, tokenizer.json, ...).
                    Treat it as read-only (copy it if a test must change it).
``onnx_fp32_path``  that model exported to ONNX fp32 (KV cache), with ``tokenizer.json`` beside it
``onnx_int8_path``  the int8 (dynamic, per-channel MatMul) export

The trained model is also cached across sessions in ``.edgellm-cache/`` keyed by a hash of the
build code (set EDGELLM_TEST_NO_CACHE=1 to retrain).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_STEPS = 120
_CODE = [
    "edgellm/pipeline/config.py",
    "edgellm/pipeline/model.py",
    "edgellm/pipeline/tokenizer.py",
    "edgellm/pipeline/train.py",
    "edgellm/pipeline/data.py",
    "edgellm/data/corpus.py",
]


def _code_hash() -> str:
    h = hashlib.sha256(str(TINY_STEPS).encode())
    for rel in _CODE:
        h.update((REPO / rel).read_bytes())
    return h.hexdigest()[:16]


def train_tiny(out: Path, steps: int = TINY_STEPS, seed: int = 0) -> Path:
    """Train the tiny preset on the embedded corpus into ``out`` (about 25 s on one core)."""
    from edgellm.pipeline.train import TrainConfig, train_model

    train_model(
        "builtin:devices",
        "tiny",
        out,
        TrainConfig(steps=steps, batch_size=16, seq_len=128, eval_every=0, progress=False, seed=seed),
    )
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build") / "tiny"
    cache = REPO / ".edgellm-cache" / f"tiny-model-{_code_hash()}"
    if os.environ.get("EDGELLM_TEST_NO_CACHE") or not (cache / "model.safetensors").exists():
        train_tiny(out)
        if not os.environ.get("EDGELLM_TEST_NO_CACHE"):
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
                shutil.copytree(out, tmp)
                os.replace(tmp, cache)
            except OSError:
                pass
    else:
        shutil.copytree(cache, out)
    return out


@pytest.fixture(scope="session")
def onnx_fp32_path(tiny_model_dir, tmp_path_factory) -> Path:
    from edgellm.pipeline.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(tiny_model_dir, out, fmt="onnx", evaluate=False)
    return out


@pytest.fixture(scope="session")
def onnx_int8_path(tiny_model_dir, tmp_path_factory) -> Path:
    from edgellm.pipeline.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx8") / "model.int8.onnx"
    export_onnx(tiny_model_dir, out, fmt="onnx-int8", evaluate=False)
    return out

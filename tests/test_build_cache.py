"""The candidate cache key covers the code that made a candidate, not only its inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import edgellm
from edgellm.pipeline import candidate_cache as cc

PACKAGE = Path(edgellm.__file__).resolve().parent


def test_an_upgrade_of_edgellm_changes_every_key(monkeypatch):
    before = cc.cache_key("model-sha", "gguf-q8_0", "eval-sha")

    monkeypatch.setattr(edgellm, "__version__", edgellm.__version__ + ".post1")

    assert cc.cache_key("model-sha", "gguf-q8_0", "eval-sha") != before


def test_the_key_covers_the_exporters_and_the_runtimes_that_measure():
    files = {f.relative_to(PACKAGE).as_posix() for f in cc.code_files()}

    assert {
        "pipeline/export/gguf.py",
        "pipeline/export/onnx.py",
        "pipeline/export/quantize_gguf.py",
        "pipeline/candidates.py",
        "runtime/llamacpp.py",
        "runtime/onnx.py",
    } <= files


def test_editing_an_exporter_changes_the_fingerprint(tmp_path):
    copy = tmp_path / "edgellm"
    for f in cc.code_files():
        dst = copy / f.relative_to(PACKAGE)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    same = cc.code_fingerprint(copy)

    gguf = copy / "pipeline" / "export" / "gguf.py"
    gguf.write_text(gguf.read_text() + "\n# a changed exporter\n")

    assert same == cc.code_fingerprint(PACKAGE)
    assert cc.code_fingerprint(copy) != same

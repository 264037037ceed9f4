"""`edgellm train|distill|export|eval` end to end through the CLI (tiny sizes)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from edgellm.cli import main
from edgellm.data import generate_corpus

MICRO = dict(
    vocab_size=400,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
)
FAST = ["--steps", "8", "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "2", "--quiet"]


def _run(args):
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    return r


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "data.txt"
    p.write_text("\n".join(generate_corpus(300, seed=5)))  # documents separated by blank lines
    return p


def test_train_export_eval_distill(tmp_path, data_file):
    cfg = tmp_path / "micro.json"
    cfg.write_text(json.dumps(MICRO))
    r = _run(["train", "--data", str(data_file), "--config", str(cfg), "--out", str(tmp_path / "m"), *FAST])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["steps"] == 8 and rep["data"]["sha256"] and "history" not in rep

    r = _run(
        ["export", "--model", str(tmp_path / "m"), "--format", "onnx-int8", "--out", str(tmp_path / "o" / "m.onnx")]
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["format"] == "onnx-int8" and rep["eval"]["top1_agreement"] > 0.9
    assert (tmp_path / "o" / "m.onnx.report.json").exists() and (tmp_path / "o" / "tokenizer.json").exists()

    r = _run(
        ["eval", "--model", str(tmp_path / "o" / "m.onnx"), "--reference", str(tmp_path / "m"), "--max-windows", "2"]
    )
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["kind"] == "onnx" and ev["perplexity"] > 1 and ev["bits_per_byte"] > 0

    student = tmp_path / "student.json"
    student.write_text(json.dumps({**MICRO, "hidden_size": 32, "intermediate_size": 64}))
    r = _run(
        [
            "distill",
            "--teacher",
            str(tmp_path / "m"),
            "--data",
            str(data_file),
            "--student-config",
            str(student),
            "--out",
            str(tmp_path / "s"),
            *FAST,
        ]
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["student_params"] < d["teacher_params"] and 0 <= d["top1_agreement"] <= 1


def test_cli_errors_are_friendly_and_write_nothing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = CliRunner().invoke(
        main, ["train", "--data", str(empty), "--config", "tiny", "--out", str(tmp_path / "m"), "--quiet"]
    )
    assert r.exit_code == 1 and "empty.jsonl" in r.output and "hint:" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]
    r = CliRunner().invoke(main, ["train", "--data", "builtin:devices", "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "--config" in r.output
    (tmp_path / "md").mkdir()
    r = CliRunner().invoke(
        main, ["export", "--model", str(tmp_path / "md"), "--format", "tflite", "--out", str(tmp_path / "x")]
    )
    assert r.exit_code == 2 and "unknown format" in r.output


def test_export_dispatches_gguf_formats(tiny_model_dir, tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "m.gguf"
    r = _run(["export", "--model", str(tiny_model_dir), "--format", "gguf-f32", "--out", str(out), "--no-eval"])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:4] == b"GGUF" and (tmp_path / "m.gguf.report.json").exists()


def test_train_on_one_record_per_line_text_with_progress_lines(tmp_path):
    """A 180 KB file without blank lines (one document) still gets a validation split, and a run
    outside a terminal prints plain progress lines as it goes, not silence."""
    records = tmp_path / "records.txt"
    lines = [
        f"sensor {i % 53} reports {18 + i % 11}.{i % 10} degrees, battery {i % 100} percent\n" for i in range(3600)
    ]
    records.write_text("".join(lines))
    assert records.stat().st_size > 170_000 and "\n\n" not in records.read_text()
    cfg = tmp_path / "micro.json"
    cfg.write_text(json.dumps(MICRO))

    r = _run(
        [
            "train",
            "--data",
            str(records),
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "m"),
            "--steps",
            "20",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--warmup-steps",
            "2",
        ]
    )

    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["data"]["val_docs"] >= 1
    progress = [line for line in r.stderr.splitlines() if line.startswith("[train] ")]
    assert any(" 10/20 " in line for line in progress) and any(" 20/20 " in line for line in progress), r.stderr


def test_eval_without_data_refuses_a_model_edgellm_did_not_train(hf_llama_dir, tmp_path):
    """A brought-in model records no training data: scoring it on the demo corpus would mislead."""
    r = CliRunner().invoke(main, ["eval", "--model", str(hf_llama_dir), "--max-windows", "1"])

    assert r.exit_code == 1 and "--data" in r.output and "hint:" in r.output
    assert "perplexity" not in r.output

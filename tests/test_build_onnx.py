"""ONNX export (fp32 / int8) against the torch model: logits, KV-cache greedy decode, size, quality."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from edgellm.errors import BuildError  # noqa: E402
from edgellm.pipeline.evaluate import evaluate_artifact  # noqa: E402
from edgellm.pipeline.export.onnx import export_onnx, report_path  # noqa: E402
from edgellm.pipeline.model import generate_ids, load_model  # noqa: E402


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _empty_past(model, batch):
    c = model.config
    z = np.zeros((batch, c.num_key_value_heads, 0, c.head_dim_), np.float32)
    return {f"past.{i}.{k}": z for i in range(c.num_hidden_layers) for k in ("key", "value")}


def test_fp32_logits_match_torch_with_dynamic_batch_and_cache(tiny_model_dir, onnx_fp32_path):
    torch.set_num_threads(1)
    model = load_model(tiny_model_dir)
    sess = _session(onnx_fp32_path)
    rng = np.random.default_rng(0)
    for batch, seq in ((1, 5), (3, 17)):
        ids = rng.integers(0, model.config.vocab_size, (batch, seq)).astype(np.int64)
        outs = sess.run(None, {"input_ids": ids, **_empty_past(model, batch)})
        with torch.no_grad():
            ref, ref_past = model(torch.from_numpy(ids))
        assert np.abs(outs[0] - ref.numpy()).max() <= 1e-4
        assert np.abs(outs[1] - ref_past[0][0].numpy()).max() <= 1e-4
        # a second chunk on top of the cache (past_len > 0, seq > 1)
        more = rng.integers(0, model.config.vocab_size, (batch, 4)).astype(np.int64)
        past = {
            f"past.{i}.{k}": outs[1 + 2 * i + j]
            for i in range(model.config.num_hidden_layers)
            for j, k in enumerate(("key", "value"))
        }
        outs2 = sess.run(None, {"input_ids": more, **past})
        with torch.no_grad():
            ref2, _ = model(torch.from_numpy(more), ref_past)
        assert np.abs(outs2[0] - ref2.numpy()).max() <= 1e-4


def test_greedy_kv_cache_decode_equals_torch_for_32_steps(tiny_model_dir, onnx_fp32_path):
    model = load_model(tiny_model_dir)
    sess = _session(onnx_fp32_path)
    prompt = [1, 5, 40, 41, 42]
    want = generate_ids(model, prompt, 32)  # no EOS stop: exactly 32 steps
    logits, *presents = sess.run(None, {"input_ids": np.array([prompt], np.int64), **_empty_past(model, 1)})
    got = []
    for _ in range(32):
        nxt = int(logits[0, -1].argmax())
        got.append(nxt)
        past = {
            f"past.{i}.{k}": presents[2 * i + j]
            for i in range(model.config.num_hidden_layers)
            for j, k in enumerate(("key", "value"))
        }
        logits, *presents = sess.run(None, {"input_ids": np.array([[nxt]], np.int64), **past})
    assert got == want
    assert presents[0].shape[2] == len(prompt) + 32


def test_int8_is_small_and_keeps_perplexity(tiny_model_dir, onnx_fp32_path, onnx_int8_path):
    ratio = onnx_int8_path.stat().st_size / onnx_fp32_path.stat().st_size
    assert ratio <= 0.35
    fp = evaluate_artifact(onnx_fp32_path, model_dir=tiny_model_dir, max_windows=4, speed_tokens=4)
    q = evaluate_artifact(onnx_int8_path, model_dir=tiny_model_dir, max_windows=4, speed_tokens=4)
    assert abs(q["perplexity"] / fp["perplexity"] - 1) <= 0.02
    assert q["top1_agreement"] >= 0.95
    assert fp["kl_divergence"] < 1e-6 and fp["top1_agreement"] == 1.0
    assert q["bits_per_byte"] > 0 and q["decode_tokens_per_second"] > 0


def test_export_writes_report_and_metadata(tiny_model_dir, tmp_path):
    out = tmp_path / "m.onnx"
    rep = export_onnx(tiny_model_dir, out, fmt="onnx", eval_windows=2)
    on_disk = json.loads(report_path(out).read_text())
    assert on_disk == json.loads(json.dumps(rep))
    assert rep["eval"]["top1_agreement"] == 1.0 and rep["size_bytes"] == out.stat().st_size
    meta = _session(out).get_modelmeta().custom_metadata_map
    assert meta["edgellm.format"] == "onnx" and meta["edgellm.num_layers"] == "2"
    assert json.loads(meta["edgellm.tokenizer"])["model"]["type"] == "BPE"
    assert (tmp_path / "tokenizer.json").exists()


def test_export_of_a_broken_model_leaves_nothing(tiny_model_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(BuildError, match="model.safetensors"):
        export_onnx(bad, out_dir / "m.onnx", fmt="onnx-int8")
    assert list(out_dir.iterdir()) == []
    with pytest.raises(BuildError, match="unknown ONNX format"):
        export_onnx(tiny_model_dir, out_dir / "m.onnx", fmt="onnx-fp8")


def test_transformers_checkpoint_exports_and_generates_on_device_runtime(tmp_path):
    """A user's HF checkpoint (saved by transformers, own tokenizer) -> ONNX -> OnnxRuntime."""
    transformers = pytest.importorskip("transformers")
    from edgellm.data import generate_corpus
    from edgellm.pipeline import tokenizer as tk
    from edgellm.runtime import GenerationParams
    from edgellm.runtime.onnx import OnnxRuntime

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=400,
        initializer_range=0.2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    tk.train_tokenizer(generate_corpus(200), 400).save(str(tmp_path / "hf" / "tokenizer.json"))
    out = tmp_path / "onnx" / "model.onnx"
    export_onnx(tmp_path / "hf", out, fmt="onnx", evaluate=False)
    with OnnxRuntime.load(out) as rt:
        prompt = rt.tokenize("turn on the kitchen")
        c = rt.complete(prompt, GenerationParams(max_tokens=16))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)[
            0, len(prompt) :
        ].tolist()
    n = len(c.token_ids)
    assert list(c.token_ids) == ref[:n]  # equal up to an EOS (which HF would also stop at)

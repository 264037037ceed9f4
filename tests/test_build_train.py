"""Data, tokenizer, training (resume, fine-tune, atomic output) and distillation."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from edgellm.data import generate_corpus  # noqa: E402
from edgellm.errors import BuildError  # noqa: E402
from edgellm.pipeline import tokenizer as tk  # noqa: E402
from edgellm.pipeline.data import load_dataset, split_documents  # noqa: E402
from edgellm.pipeline.distill import distill_model  # noqa: E402
from edgellm.pipeline.model import load_model  # noqa: E402
from edgellm.pipeline.train import TrainConfig, train_model  # noqa: E402
from edgellm.runtime.base import render_chat  # noqa: E402

MICRO = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def small_jsonl(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "d.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in generate_corpus(400, seed=3)))
    return p


def _tc(**kw):
    base = dict(steps=12, batch_size=4, seq_len=32, eval_every=0, progress=False, warmup_steps=3)
    base.update(kw)
    return TrainConfig(**base)


def test_corpus_and_split_are_deterministic(tmp_path):
    assert generate_corpus(50, seed=1) == generate_corpus(50, seed=1)
    docs = generate_corpus(300)
    tr, va = split_documents(docs, 0.1)
    tr2, va2 = split_documents(list(reversed(docs)), 0.1)
    assert sorted(va) == sorted(va2) and len(tr) == len(tr2) and va
    (tmp_path / "a.txt").write_text("first doc\nline two\n\nsecond doc\n\n\nthird\n")
    ds = load_dataset(tmp_path / "a.txt", val_fraction=0.3)
    assert sorted(ds.train + ds.val) == ["first doc\nline two\n", "second doc\n", "third\n"]
    assert len(ds.sha256) == 64 and ds.sources[0]["path"].endswith("a.txt")


def test_tokenizer_specials_and_chat_template():
    import jinja2

    tok = tk.train_tokenizer(generate_corpus(200), 400)
    assert [tok.token_to_id(t) for t in tk.SPECIAL_TOKENS] == list(range(7))
    text = "turn on the kitchen light, then say </s> é 温度"
    assert tok.decode(tk.encode(tok, text, special=False)) == text  # byte-level: lossless
    assert tok.token_to_id("</s>") not in tk.encode(tok, text, special=False)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = jinja2.Environment().from_string(tk.CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=True)
    assert rendered == render_chat(msgs)
    # the chat ids equal tokenizing the rendered template with special tokens parsed
    assert tk.encode_chat(tok, msgs) == tk.encode(tok, render_chat(msgs), special=True)


def test_empty_data_file_is_a_clear_error_and_writes_nothing(tmp_path):
    for name, content in (("empty.txt", ""), ("blank.jsonl", "\n\n"), ("e2.jsonl", '{"text": ""}\n')):
        f = tmp_path / name
        f.write_text(content)
        with pytest.raises(BuildError, match=name) as e:
            train_model(f, MICRO, tmp_path / "out", _tc())
        assert e.value.hint
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(BuildError, match="bad.jsonl:1"):
        train_model(bad, MICRO, tmp_path / "out", _tc())
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_resume_after_a_crash_gives_the_same_model(tmp_path, small_jsonl, monkeypatch):
    straight = train_model(small_jsonl, MICRO, tmp_path / "a", _tc())
    calls = {"n": 0}
    real = torch.nn.utils.clip_grad_norm_

    def crash_at_step_9(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt("power cut")
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", crash_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        train_model(small_jsonl, MICRO, tmp_path / "b", _tc(checkpoint_every=4))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real)
    assert not (tmp_path / "b").exists()  # nothing half-written
    ckpt = tmp_path / "b.ckpt"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 8
    assert (ckpt / "optimizer.safetensors").exists() and not list(ckpt.glob("*.pt"))
    resumed = train_model(small_jsonl, MICRO, tmp_path / "b", _tc(checkpoint_every=4), resume=True)
    assert resumed["resumed_from_step"] == 8 and resumed["steps"] == 12
    a, b = load_model(tmp_path / "a").state_dict(), load_model(tmp_path / "b").state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert abs(resumed["val_loss"] - straight["val_loss"]) < 1e-5
    assert not ckpt.exists()  # removed after success


def test_report_lineage_and_fine_tune(tmp_path, small_jsonl):
    rep = train_model(small_jsonl, MICRO, tmp_path / "base", _tc(steps=6))
    assert rep["data"]["sha256"] and rep["data"]["sources"][0]["sha256"]
    assert rep["params"] == load_model(tmp_path / "base").num_parameters()
    on_disk = json.loads((tmp_path / "base" / "train_report.json").read_text())
    assert on_disk["val_ppl"] == pytest.approx(rep["val_ppl"]) and on_disk["history"]
    ft = train_model(small_jsonl, None, tmp_path / "ft", _tc(steps=6, lr=1e-3), from_dir=tmp_path / "base")
    assert ft["from"] == str(tmp_path / "base") and ft["val_loss"] < rep["val_loss"]
    assert (tmp_path / "ft" / "tokenizer.json").read_bytes() == (tmp_path / "base" / "tokenizer.json").read_bytes()
    with pytest.raises(BuildError, match="already exists"):
        train_model(small_jsonl, None, tmp_path / "ft", _tc(steps=1), from_dir=tmp_path / "base")


@pytest.mark.slow
def test_distilled_student_beats_same_size_student_without_teacher(tiny_model_dir, tmp_path):
    """Same data, same steps, same seed; the only difference is the teacher's soft targets."""
    student = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    tc = TrainConfig(steps=100, batch_size=4, seq_len=64, eval_every=0, progress=False, seed=0)
    kd = distill_model(tiny_model_dir, "builtin:devices", student, tmp_path / "kd", tc)
    plain = distill_model(tiny_model_dir, "builtin:devices", student, tmp_path / "plain", tc, alpha=0.0)
    assert kd["student_params"] * 4 <= kd["teacher_params"]
    assert kd["student_val_ppl"] < plain["student_val_ppl"]
    assert kd["top1_agreement"] > plain["top1_agreement"]
    assert kd["teacher_val_ppl"] < kd["student_val_ppl"]
    rep = json.loads((tmp_path / "kd" / "distill_report.json").read_text())
    assert rep["student_params"] == load_model(tmp_path / "kd").num_parameters()
    assert (tmp_path / "kd" / "tokenizer.json").exists()

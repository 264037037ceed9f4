"""The Llama model, its HF directory format, and parity with transformers (test-only dependency)."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgellm.errors import BuildError  # noqa: E402
from edgellm.pipeline import tokenizer as tk  # noqa: E402
from edgellm.pipeline.config import ModelConfig, resolve_config  # noqa: E402
from edgellm.pipeline.model import LlamaLM, generate_ids, load_model, save_model_dir  # noqa: E402


def _hf_model(tie: bool, **kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        tie_word_embeddings=tie,
        initializer_range=0.2,
        max_position_embeddings=128,
        **kw,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_forward_matches_transformers(tmp_path, tie):
    torch.set_num_threads(1)
    hf = _hf_model(tie)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got, past = ours(ids)
        # incremental decode with the KV cache gives the same logits
        a, p = ours(ids[:, :11])
        b, _ = ours(ids[:, 11:], p)
    assert ref.abs().max() > 1.0  # logits are not trivially small
    assert (ref - got).abs().max().item() <= 1e-4
    assert (torch.cat([a, b], 1) - got).abs().max().item() <= 1e-4
    assert len(past) == 2 and past[0][0].shape == (2, 2, 19, 16)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    hf = _hf_model(
        True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        rope_theta=500000.0,
    )
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(0, 300, (1, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)[0]).abs().max().item() <= 1e-4


def test_transformers_dir_loads_and_generates(tmp_path):
    """A user's HF checkpoint (here: saved by transformers, sharded) goes through our loader."""
    hf = _hf_model(False)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    tok = tk.train_tokenizer(["turn on the light\n", "open the door\n"] * 50, 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = load_model(tmp_path)
    prompt = tk.encode(tok, "turn on the", special=False)
    got = generate_ids(ours, prompt, 12)
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert got == ref
    assert isinstance(tok.decode(got), str)


def test_save_load_roundtrip_keeps_unknown_fields(tmp_path):
    cfg = ModelConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        extra={"my_field": 7},
    )
    m = LlamaLM(cfg)
    save_model_dir(m, tmp_path / "m")
    cfg_json = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg_json["architectures"] == ["LlamaForCausalLM"] and cfg_json["my_field"] == 7
    m2 = load_model(tmp_path / "m")
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    # transformers reads our directory too
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        assert (hf(ids).logits - m2(ids)[0]).abs().max().item() <= 1e-4


def test_presets_suit_kquants():
    for name in ("tiny", "small"):
        c = resolve_config(name)
        assert c.hidden_size % 256 == 0 and c.intermediate_size % 256 == 0


def _small_dir(tmp_path):
    cfg = ModelConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return save_model_dir(LlamaLM(cfg), tmp_path / "m")


def test_truncated_weights_are_a_clear_error(tmp_path):
    d = _small_dir(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(BuildError, match="model.safetensors") as e:
        load_model(d)
    assert e.value.hint


def test_corrupted_header_is_a_clear_error(tmp_path):
    d = _small_dir(tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(BuildError, match="model.safetensors"):
        load_model(d)


def test_config_not_matching_weights(tmp_path):
    d = _small_dir(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BuildError, match="config.json does not match the weights") as e:
        load_model(d)
    assert "intermediate_size" not in str(e.value) or "shape" in str(e.value)


def test_pickle_only_dir_is_refused(tmp_path):
    d = _small_dir(tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(BuildError, match="pickle"):
        load_model(d)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import edgellm.pipeline.model as mm

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mm, "state_for_saving", boom)
    cfg = ModelConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with pytest.raises(OSError):
        save_model_dir(LlamaLM(cfg), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_tiny_model_fixture(tiny_model_dir):
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "train_report.json",
    ):
        assert (tiny_model_dir / name).exists(), name
    report = json.loads((tiny_model_dir / "train_report.json").read_text())
    assert report["val_ppl"] < 4.0  # learned the regular corpus well beyond unigram level
    tcfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in tcfg["chat_template"]
    m = load_model(tiny_model_dir)
    tok = tk.load_tokenizer(tiny_model_dir)
    for i, t in enumerate(tk.SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i
    assert m.config.vocab_size == tok.get_vocab_size()
    # copy to avoid touching the shared fixture
    shutil.copytree(tiny_model_dir, tiny_model_dir.parent / "copy")

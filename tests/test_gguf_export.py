"""GGUF export: a transformers checkpoint -> GGUF -> llama.cpp matches transformers and tokenizers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fixtures_gguf import MIXED_TEXT, make_hf_llama, training_corpus


def _eval_ids(rt) -> list[int]:
    return rt.tokenize(" ".join(training_corpus(60)[40:]), add_bos=False)[:256]


def test_transformers_checkpoint_f32_logits_match(hf_llama_dir, gguf_exports):
    import torch
    from transformers import LlamaForCausalLM

    from edgellm.runtime.llamacpp import LlamaCppRuntime

    torch.set_num_threads(1)
    with LlamaCppRuntime.load(gguf_exports["gguf-f32"], kv_cache_type="f32") as rt:
        ids = rt.tokenize(MIXED_TEXT + " The robot reads the temperature", add_bos=False)
        ours = rt.logits(ids)
    model = LlamaForCausalLM.from_pretrained(hf_llama_dir).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_llama_cpp_tokenizes_mixed_text_like_tokenizers(hf_llama_dir, gguf_exports):
    from tokenizers import Tokenizer

    from edgellm.runtime.llamacpp import LlamaCppRuntime

    tok = Tokenizer.from_file(str(hf_llama_dir / "tokenizer.json"))
    texts = [MIXED_TEXT, " leading space", "a  b\n\n\tc", "x" * 50 + " 1234567 3.14", "Ærø 😀👍🏽 ∑∫ 日本語"]
    with LlamaCppRuntime.load(gguf_exports["gguf-q8_0"]) as rt:
        for text in texts:
            ours = rt.tokenize(text, add_bos=False)
            assert ours == tok.encode(text, add_special_tokens=False).ids, text
            assert rt.detokenize(ours) == text
        # with special-token parsing on, both agree on text containing role markers
        chat = "<|user|>\nCafé 🤖</s><|assistant|>\n"
        assert rt.tokenize(chat, add_bos=False, special=True) == tok.encode(chat).ids
        # special tokens are never parsed out of user text, only when asked
        user_id = tok.token_to_id("<|user|>")
        assert user_id not in rt.tokenize("hi <|user|> </s>", add_bos=False)
        assert user_id in rt.tokenize("hi <|user|>", add_bos=False, special=True)


def test_metadata_and_tokenizer_keys(gguf_exports):
    import gguf

    r = gguf.GGUFReader(str(gguf_exports["gguf-f16"]))

    def v(key):
        return r.get_field(key).contents()

    assert v("general.architecture") == "llama"
    assert v("tokenizer.ggml.model") == "gpt2" and v("tokenizer.ggml.pre") == "gpt-2"
    assert v("llama.attention.head_count") == 4 and v("llama.attention.head_count_kv") == 2
    assert v("llama.rope.dimension_count") == 64
    assert v("tokenizer.ggml.add_bos_token") is False
    assert "<|assistant|>" in v("tokenizer.chat_template")
    assert v("tokenizer.ggml.eos_token_id") == 1
    types = r.get_field("tokenizer.ggml.token_type").contents()
    assert types[:5] == [3, 3, 3, 3, 3]  # special tokens are CONTROL
    assert {t.tensor_type.name for t in r.tensors if len(t.shape) == 1} == {"F32"}  # norms stay F32


def test_quantized_sizes_types_and_agreement(hf_llama_dir, gguf_exports, tmp_path):
    from edgellm.pipeline.export.gguf import export_gguf
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    report = export_gguf(hf_llama_dir, tmp_path / "q4km.gguf", "gguf-q4_k_m")
    assert report["fallbacks"] == []
    assert set(report["type_counts"]) == {"F32", "Q4_K", "Q6_K"}
    sizes = {fmt: p.stat().st_size for fmt, p in gguf_exports.items()}
    assert sizes["gguf-f32"] > sizes["gguf-f16"] > sizes["gguf-q8_0"] > sizes["gguf-q4_k_m"]

    with LlamaCppRuntime.load(gguf_exports["gguf-f32"], kv_cache_type="f32") as rt:
        ids = _eval_ids(rt)
        ref = rt.logits(ids).argmax(-1)
    agree = {}
    for fmt in ("gguf-q8_0", "gguf-q4_k_m"):
        with LlamaCppRuntime.load(gguf_exports[fmt]) as rt:
            agree[fmt] = float((rt.logits(ids).argmax(-1) == ref).mean())
    assert agree["gguf-q8_0"] >= 0.98, agree
    assert agree["gguf-q4_k_m"] >= 0.90, agree


def test_k_quant_fallback_is_reported(tmp_path):
    """hidden=96 is not a multiple of 256: llama.cpp silently falls back; we say so per tensor."""
    from edgellm.pipeline.export.gguf import export_gguf

    d = make_hf_llama(tmp_path / "odd", train_steps=0, hidden=96, intermediate=160, tie_embeddings=True)
    report = export_gguf(d, tmp_path / "odd-q4km.gguf", "gguf-q4_k_m")
    assert report["tied_embeddings"] is True
    assert report["fallbacks"], report["type_counts"]
    fb = report["fallbacks"][0]
    assert "not a multiple of 256" in fb["reason"] and fb["type"] != "Q4_K"
    by_name = {t["name"]: t["type"] for t in report["tensors"]}
    assert by_name[fb["tensor"]] == fb["type"]


def test_export_refuses_what_llama_cpp_cannot_reproduce(hf_llama_dir, tmp_path):
    from edgellm.errors import BuildError
    from edgellm.pipeline.export.gguf import export_gguf

    with pytest.raises(BuildError, match="unknown GGUF format"):
        export_gguf(hf_llama_dir, tmp_path / "x.gguf", "gguf-q3_k")
    with pytest.raises(BuildError, match="config.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf", "gguf-f16")
    bad = tmp_path / "prefix-space"
    shutil.copytree(hf_llama_dir, bad)
    tj = json.loads((bad / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["add_prefix_space"] = True
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(BuildError, match="prefix space") as e:
        export_gguf(bad, tmp_path / "x.gguf", "gguf-f16")
    assert e.value.hint
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope_scaling_matches_transformers(tmp_path, rope):
    import torch
    from transformers import LlamaForCausalLM

    from edgellm.pipeline.export.gguf import export_gguf
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    d = make_hf_llama(tmp_path / "rope", train_steps=0, rope=rope)
    export_gguf(d, tmp_path / "rope.gguf", "gguf-f32")
    with LlamaCppRuntime.load(tmp_path / "rope.gguf", kv_cache_type="f32") as rt:
        ids = rt.tokenize(" ".join(training_corpus(40)), add_bos=False)[:300]
        ours = rt.logits(ids)
    model = LlamaForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() < 1e-3

"""Our own torch model (build pipeline I) -> GGUF F32 -> llama.cpp: same logits, same tokens."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_gguf import MIXED_TEXT


@pytest.fixture(scope="module")
def ours_f32(tmp_path_factory, tiny_model_dir):
    from edgellm.pipeline.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("ours") / "tiny-f32.gguf"
    report = export_gguf(tiny_model_dir, out, "gguf-f32")
    return out, report


def test_torch_model_and_llama_cpp_f32_logits_match(tiny_model_dir, ours_f32):
    import torch

    from edgellm.pipeline.model import load_model
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    torch.set_num_threads(1)
    path, _ = ours_f32
    with LlamaCppRuntime.load(path, kv_cache_type="f32") as rt:
        ids = rt.tokenize(MIXED_TEXT + "\nThe robot arm moves", add_bos=True)
        ours = rt.logits(ids)
    model = load_model(tiny_model_dir).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(ours - ref).max() < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_llama_cpp_tokenizes_like_our_tokenizer(tiny_model_dir, ours_f32):
    from edgellm.pipeline.tokenizer import encode, load_tokenizer
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    tok = load_tokenizer(tiny_model_dir)
    texts = [MIXED_TEXT, MIXED_TEXT + " <|user|> </s> <s>", "  two  spaces\n\n\ttab", "ÆØÅ ñ ü 😀👍🏽 日本語 ∑"]
    with LlamaCppRuntime.load(ours_f32[0]) as rt:
        for text in texts:
            assert rt.tokenize(text, add_bos=False) == encode(tok, text, special=False), text
            assert rt.tokenize(text, add_bos=False, special=True) == encode(tok, text, special=True), text
        # add_bos follows the tokenizer's post-processor (BOS first)
        assert rt.tokenize("hello", add_bos=True) == tok.encode("hello").ids
        assert rt.detokenize(rt.tokenize(MIXED_TEXT, add_bos=False)) == MIXED_TEXT


def test_tied_embeddings_and_bos_in_metadata(ours_f32):
    _, report = ours_f32
    assert report["tied_embeddings"] is True
    assert report["fallbacks"] == [] and report["type_counts"] == {"F32": 20}


def test_chat_ids_match_training_tokenization(tiny_model_dir, ours_f32):
    from edgellm.pipeline.tokenizer import encode_chat, load_tokenizer
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    tok = load_tokenizer(tiny_model_dir)
    msgs = [{"role": "system", "content": "Réponds brièvement 🤖"}, {"role": "user", "content": "status? </s><|user|>"}]
    with LlamaCppRuntime.load(ours_f32[0]) as rt:
        assert rt.chat_token_ids(msgs) == [rt.info.bos_id] + encode_chat(tok, msgs)

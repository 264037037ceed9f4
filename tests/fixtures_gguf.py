"""GGUF fixtures (build pipeline II): a tiny HF Llama checkpoint and its GGUF exports.

hf_llama_dir   an HF-format dir written by transformers' ``save_pretrained`` (tiny Llama,
               dims multiples of 256 so K-quants apply, GQA 4/2 heads), a byte-level BPE
               ``tokenizer.json`` trained with ``tokenizers``, tokenizer_config.json with special
               tokens and edgellm's chat template; briefly trained so its predictions are peaked
gguf_exports   {"gguf-f32": Path, "gguf-f16": ..., "gguf-q8_0": ..., "gguf-q4_k_m": ...}
tiny_gguf      a Q8_0 GGUF path (what a device would serve)
tiny_gguf_f16  an F16 GGUF path
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SPECIAL_TOKENS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MIXED_TEXT = "Hello wörld! Café crème, naïve — 🤖🚀 你好.\ndef f(x):\n    return x * 2  # ok\t{'a': [1, 2]}"

_NAMES = ["robot", "sensor", "camera", "motor", "drone", "gateway", "valve", "pump"]
_VERBS = ["reads", "reports", "checks", "moves", "logs", "sends", "stops", "starts"]
_OBJS = ["the temperature", "the speed", "a warning", "the battery", "the door", "the light"]


def training_corpus(n: int = 400) -> list[str]:
    """Regular, learnable text (a tiny model learns it in seconds) with some code and accents."""
    out = []
    for i in range(n):
        a, v, o = _NAMES[i % 8], _VERBS[(i * 3) % 8], _OBJS[(i * 5) % 6]
        out.append(f"The {a} {v} {o} every {i % 7 + 1} seconds.")
        if i % 10 == 0:
            out.append(f"def {a}_{i % 5}(x):\n    return x + {i % 9}")
        if i % 25 == 0:
            out.append("Café crème, naïve façade — über 🤖🚀 你好")
    return out


def make_hf_llama(
    out: Path,
    *,
    train_steps: int = 60,
    seed: int = 0,
    hidden: int = 256,
    intermediate: int = 512,
    tie_embeddings: bool = False,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    rope: dict | None = None,
) -> Path:
    """Write a tiny trained Llama checkpoint with transformers' save_pretrained (test-only)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    corpus = training_corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "add_bos_token": False,
                "add_eos_token": False,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=tie_embeddings,
        **({"rope_parameters": {"rope_theta": 10000.0, **rope}} if rope else {}),
    )
    model = LlamaForCausalLM(cfg)
    ids = []
    for line in corpus:
        ids += tok.encode(line).ids + [1]
    data = torch.tensor(ids)
    seq, batch = 64, 8
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(train_steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out)
    if train_steps:
        (out / "train_loss.txt").write_text(f"{loss.item():.4f}\n")
    return out


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory) -> Path:
    return make_hf_llama(tmp_path_factory.mktemp("hf-llama") / "model")


@pytest.fixture(scope="session")
def gguf_exports(tmp_path_factory, hf_llama_dir) -> dict[str, Path]:
    from edgellm.pipeline.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf")
    paths = {}
    for fmt in ("gguf-f32", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"):
        paths[fmt] = out / f"model-{fmt[5:]}.gguf"
        export_gguf(hf_llama_dir, paths[fmt], fmt)
    return paths


@pytest.fixture(scope="session")
def tiny_gguf(gguf_exports) -> Path:
    """A Q8_0 GGUF of a tiny trained Llama (chat template + special tokens included)."""
    return gguf_exports["gguf-q8_0"]


@pytest.fixture(scope="session")
def tiny_gguf_f16(gguf_exports) -> Path:
    return gguf_exports["gguf-f16"]

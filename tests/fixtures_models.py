"""Tiny random checkpoints of every supported family, written by transformers (test-only).

    make_family(out, name) -> Path   an HF-format directory: config.json + model.safetensors written
                                     by transformers' save_pretrained (random weights, random norms and
                                     biases so every tensor matters), the family's kind of tokenizer
                                     (trained here with tokenizers or sentencepiece) and its own chat
                                     template in tokenizer_config.json.

Families (FAMILY_SPECS): llama3 (Llama-3.2 layout: tied embeddings, llama3 RoPE scaling, byte-level BPE
with Llama 3's split regex), tinyllama (Llama 2 layout, sentencepiece tokenizer.model), mistral
(sliding window, sentencepiece), qwen2 (q/k/v biases, Qwen's regex + NFC), qwen3 (q/k norms,
Qwen's tokenizer), smollm2 (Llama layout, digits split individually).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MIXED_TEXT = (
    "Hello wörld! Café crème, naïve — 🤖🚀 你好.\ndef f(x):\n    return x * 2  # ok\t{'a': [1, 2]} "
    "12345 678.9 ümlaut Cafe\u0301 n\u0303"
)

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
INST_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '[INST] <<SYS>>\\n' + message['content'] + '\\n<</SYS>> [/INST]' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
SMOL_TEMPLATE = CHATML.replace("You are a helpful assistant.", "You are SmolLM.")

#: name -> (transformers class names, extra config, tokenizer kind, chat template)
FAMILY_SPECS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "llama3": (
        "Llama",
        {
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
        "llama3",
        LLAMA3_TEMPLATE,
    ),
    "tinyllama": ("Llama", {}, "spm", INST_TEMPLATE),
    "mistral": ("Mistral", {"sliding_window": 120, "head_dim": 16}, "spm", INST_TEMPLATE),
    "qwen2": ("Qwen2", {"tie_word_embeddings": True}, "qwen2", CHATML),
    "qwen3": ("Qwen3", {"head_dim": 16}, "qwen2", CHATML),
    "smollm2": ("Llama", {"tie_word_embeddings": True}, "smollm", SMOL_TEMPLATE),
}


def corpus(n: int = 300) -> list[str]:
    """The GGUF fixtures' training text, plus numbers and decomposed accents for the tokenizers."""
    from fixtures_gguf import training_corpus

    extra = [f"value {i * 37 % 1000}, {i * 7919 % 100000} units; Cafe\u0301 n\u0303 {i}" for i in range(n // 3)]
    return training_corpus(n) + extra


def _bpe(kind: str, specials: list[str], bos: str | None) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from edgellm.pipeline.export.gguf_vocab import LLAMA3_REGEX, QWEN2_REGEX

    tok = Tokenizer(models.BPE())
    if kind == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        regex = QWEN2_REGEX if kind == "qwen2" else LLAMA3_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def _write_bpe(out: Path, kind: str, template: str) -> int:
    if kind == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        bos, eos, pad = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        bos, eos, pad = None, "<|im_end|>", "<|endoftext|>"
    tok = _bpe(kind, specials, bos)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "add_bos_token": bos is not None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return int(tok.get_vocab_size())


def _write_spm(out: Path, template: str) -> int:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_prefix=str(out / "tokenizer"),
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return 420


def make_family(out: Path, name: str, *, seed: int = 0) -> Path:
    """Write the tiny random checkpoint ``name`` (a key of FAMILY_SPECS) into ``out``."""
    import torch
    import transformers

    prefix, extra, tok_kind, template = FAMILY_SPECS[name]
    out.mkdir(parents=True, exist_ok=True)
    n_vocab = _write_spm(out, template) if tok_kind == "spm" else _write_bpe(out, tok_kind, template)
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    ids = {t: i for i, t in enumerate(_vocab_list(out))}
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=n_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=ids.get(tcfg["bos_token"]) if tcfg["bos_token"] else None,
        eos_token_id=ids.get(tcfg["eos_token"]),
        **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(str(out))
    return out


def _vocab_list(out: Path) -> list[str]:
    if (out / "tokenizer.model").exists():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        return [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab(with_added_tokens=True)
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def hf_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def hf_logits(model_dir: Path, ids: list[int]) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()

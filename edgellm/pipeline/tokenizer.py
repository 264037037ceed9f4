"""Byte-level BPE tokenizer (``tokenizers``), special tokens and the chat template.

Special tokens (ids fixed, in this order): ``<unk>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos),
``<pad>`` 3, ``<|system|>`` 4, ``<|user|>`` 5, ``<|assistant|>`` 6. The chat template is
:func:`edgellm.runtime.base.render_chat`, recorded as a jinja ``chat_template`` in
``tokenizer_config.json``. No torch import here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgellm.errors import BuildError
from edgellm.runtime.chat import EDGELLM_CHAT_TEMPLATE

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, *ROLE_TOKENS)

#: Jinja equivalent of edgellm.runtime.base.render_chat (bos is added by the tokenizer).
CHAT_TEMPLATE = EDGELLM_CHAT_TEMPLATE


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Any:
    """Train a byte-level BPE on ``texts``; the result may be smaller than ``vocab_size``
    when the text has fewer useful merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise BuildError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE",
            hint=f"use at least {256 + len(SPECIAL_TOKENS)}",
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "additional_special_tokens": list(ROLE_TOKENS),
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tok: Any, out_dir: Path, *, model_max_length: int) -> None:
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg_path.write_text(json.dumps(tokenizer_config(model_max_length), indent=2) + "\n", encoding="utf-8")
    smap = {
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "additional_special_tokens": list(ROLE_TOKENS),
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n", encoding="utf-8")


def find_tokenizer_file(*candidates: Path | None) -> Path:
    """The first ``tokenizer.json`` among ``candidates`` (files or directories)."""
    for c in candidates:
        if c is None:
            continue
        c = Path(c)
        p = c / "tokenizer.json" if c.is_dir() else c
        if p.name == "tokenizer.json" and p.exists():
            return p
    names = ", ".join(str(c) for c in candidates if c is not None)
    raise BuildError(
        f"no tokenizer.json found (looked in: {names})", hint="pass the model directory that holds tokenizer.json"
    )


def load_tokenizer(path: str | Path) -> Any:
    """Load ``tokenizer.json`` (a file, or a directory containing it; a directory with only a
    sentencepiece ``tokenizer.model`` is converted as transformers does)."""
    from tokenizers import Tokenizer

    d = Path(path)
    if d.is_dir() and not (d / "tokenizer.json").exists() and (d / "tokenizer.model").is_file():
        try:
            return Tokenizer.from_str(tokenizer_json_text(d))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise BuildError(
                f"{d}/tokenizer.model: unusable tokenizer ({e})", hint="copy it again from the model's source"
            ) from e
    p = find_tokenizer_file(d)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise BuildError(
            f"{p}: unreadable tokenizer ({e})", hint="the file is corrupted: copy it again from the model directory"
        ) from e


def read_tokenizer_config(model_dir: Path) -> dict[str, Any]:
    p = Path(model_dir) / "tokenizer_config.json"
    if not p.exists():
        return {}
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def chat_template_of(model_dir: Path) -> str | None:
    """The model's own chat template: ``tokenizer_config.json`` ``chat_template`` (the default
    one of a named list), else ``chat_template.jinja``; None when the model ships none."""
    template = read_tokenizer_config(model_dir).get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    jinja = Path(model_dir) / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template if isinstance(template, str) and template.strip() else None


def tokenizer_json_text(model_dir: Path) -> str:
    """``tokenizer.json`` of ``model_dir`` as text; a sentencepiece-only model (``tokenizer.model``)
    is converted with transformers, as ``AutoTokenizer`` itself would, so the ONNX runtime (which
    reads tokenizer.json) tokenizes as the Hugging Face tokenizer does."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        return (model_dir / "tokenizer.json").read_text(encoding="utf-8")
    if not (model_dir / "tokenizer.model").is_file():
        raise BuildError(
            f"no tokenizer.json or tokenizer.model in {model_dir}",
            hint="the model directory needs the tokenizer it was trained with",
        )
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(model_dir))
        return str(hf.backend_tokenizer.to_str())
    except (ImportError, OSError, ValueError, AttributeError) as e:
        raise BuildError(
            f"{model_dir}/tokenizer.model could not be converted to tokenizer.json ({e})",
            hint="pip install 'edgellm[pipeline]' (transformers, sentencepiece), or add tokenizer.json",
        ) from e


def encode(tok: Any, text: str, *, special: bool) -> list[int]:
    """Ids for ``text`` without bos/eos. ``special=False`` treats special-token strings in
    the text as plain text (never as control tokens)."""
    prev = tok.encode_special_tokens
    tok.encode_special_tokens = not special
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = prev


def chat_prompt_ids(tok: Any, messages: list[dict], model_dir: Path | None = None) -> list[int]:
    """Prompt ids of a chat as a device will build them: the model's own template when
    ``model_dir`` has one (rendered as transformers does), else bos + edgellm's role markers."""
    from edgellm.runtime.chat import ChatTemplate

    template = chat_template_of(model_dir) if model_dir is not None else None
    if template is not None and template != CHAT_TEMPLATE:
        tcfg = read_tokenizer_config(model_dir) if model_dir is not None else {}
        specials = {
            k: str(v.get("content") if isinstance(v, dict) else v)
            for k, v in tcfg.items()
            if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v
        }
        added = [t.content for t in tok.get_added_tokens_decoder().values()]
        return ChatTemplate(template, specials, added).token_ids(
            lambda text, sp: encode(tok, text, special=sp), messages
        )
    bos = tok.token_to_id(BOS)
    return ([bos] if bos is not None else []) + encode_chat(tok, messages)


def encode_chat(tok: Any, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Chat messages -> ids: role markers as special tokens, contents as plain text."""
    ids: list[int] = []
    for m in messages:
        role = m.get("role", "user")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {role!r}: use system, user or assistant")
        ids += encode(tok, f"<|{role}|>", special=True)
        ids += encode(tok, "\n" + (m.get("content") or "") + "\n", special=False)
    if add_generation_prompt:
        ids += encode(tok, "<|assistant|>", special=True) + encode(tok, "\n", special=False)
    return ids

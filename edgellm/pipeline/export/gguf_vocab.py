"""Read an HF-format tokenizer into the fields a GGUF file carries.

Two kinds, each written the way llama.cpp reads it: a sentencepiece ``tokenizer.model`` (Llama 2,
TinyLlama, Mistral v0.1; :mod:`edgellm.pipeline.export.gguf_spm`) becomes llama.cpp's ``llama``
tokenizer, and a byte-level BPE ``tokenizer.json`` (Llama 3, Qwen, SmolLM2, ours) its ``gpt2`` one.

llama.cpp must tokenize exactly as the HF tokenizer does. For a byte-level BPE that
means: ``tokenizer.ggml.model = "gpt2"``, the vocabulary in GPT-2's
byte-to-unicode alphabet (which is how ``tokenizer.json`` already stores it), the merges, token
types (added special tokens are CONTROL, so llama.cpp never parses them out of user text unless
asked to), bos/eos/unk/pad ids, explicit ``add_bos``/``add_eos`` flags, the pre-tokenizer name
whose regex equals the tokenizer's (by llama.cpp's names: gpt-2, llama3, qwen2, smollm), and the chat
template. llama.cpp applies no normalizer; an NFC normalizer (Qwen's) is recorded as
``edgellm.tokenizer.normalizer`` and applied by edgellm's runtime before llama.cpp tokenizes. Likewise a
non-legacy sentencepiece tokenizer's start-only dummy prefix (``edgellm.tokenizer.space_prefix``).

Only what llama.cpp can reproduce is accepted; anything else (another normalizer, a prefix space,
an unknown split regex) is refused with a hint instead of producing a GGUF that tokenizes differently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from edgellm.errors import BuildError

log = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The split regexes llama.cpp implements for a BPE vocabulary, by ``tokenizer.ggml.pre`` name.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_KNOWN_SPLITS = {GPT2_REGEX: "gpt-2", LLAMA3_REGEX: "llama3", QWEN2_REGEX: "qwen2"}
#: GGUF key naming the normalizer edgellm's runtime applies before llama.cpp tokenizes
NORMALIZER_KEY = "edgellm.tokenizer.normalizer"
#: GGUF key: "first" when the sentencepiece dummy prefix goes only at the start of a text (not after
#: special tokens, where llama.cpp's add_space_prefix would put it); edgellm's runtime adds it
SPACE_PREFIX_KEY = "edgellm.tokenizer.space_prefix"


@dataclasses.dataclass
class GGUFVocab:
    model: str  # llama.cpp's tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (sentencepiece)
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    special_tokens: dict[str, int]
    scores: list[float] | None = None  # sentencepiece piece scores
    add_space_prefix: bool | None = None  # sentencepiece's dummy prefix
    normalizer: str | None = None  # "NFC": applied by edgellm's runtime before tokenizing
    space_prefix: str | None = None  # "first": edgellm's runtime prefixes a space at the start only

    def write(self, writer: Any) -> None:
        """Add the tokenizer keys to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.normalizer:
            writer.add_string(NORMALIZER_KEY, self.normalizer)
        if self.space_prefix:
            writer.add_string(SPACE_PREFIX_KEY, self.space_prefix)
        if self.bos_id is not None:
            writer.add_bos_token_id(self.bos_id)
        if self.eos_id is not None:
            writer.add_eos_token_id(self.eos_id)
        if self.unk_id is not None:
            writer.add_unk_token_id(self.unk_id)
        if self.pad_id is not None:
            writer.add_pad_token_id(self.pad_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _token_content(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _pre_tokenizer_name(pre: dict | None) -> str:
    """Map a ``tokenizers`` pre-tokenizer to the llama.cpp pre-tokenizer with the same regex."""
    hint = (
        "train the tokenizer with tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False) "
        "(GPT-2 split regex), which llama.cpp reproduces exactly"
    )
    if not pre:
        raise BuildError("tokenizer.json has no pre_tokenizer; llama.cpp cannot reproduce it", hint=hint)
    kind = pre.get("type")
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise BuildError("the tokenizer adds a prefix space, which llama.cpp's BPE tokenizer does not", hint=hint)
        if pre.get("use_regex", True) is False:
            raise BuildError("ByteLevel pre-tokenizer without a split regex is not supported", hint=hint)
        return "gpt-2"
    if kind == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and parts[1].get("type") == "ByteLevel"
            and parts[1].get("use_regex") is False
            and not parts[1].get("add_prefix_space")
        ):
            pattern = (parts[0].get("pattern") or {}).get("Regex")
            if pattern in _KNOWN_SPLITS:
                return _KNOWN_SPLITS[pattern]
        if (
            len(parts) == 2
            and parts[0].get("type") == "Digits"
            and parts[0].get("individual_digits")
            and _pre_tokenizer_name(parts[1]) == "gpt-2"
        ):
            return "smollm"
        if len(parts) == 1:
            return _pre_tokenizer_name(parts[0])
    raise BuildError(f"pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent", hint=hint)


def _merges(model: dict) -> list[str]:
    out = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            out.append(m)
        else:  # tokenizers >= 0.20 stores pairs
            a, b = m
            if " " in a or " " in b:
                raise BuildError(
                    f"merge {m!r} contains a space; GGUF merges are space-separated",
                    hint="use a byte-level BPE tokenizer (spaces are encoded as 'Ġ')",
                )
            out.append(f"{a} {b}")
    if not out:
        raise BuildError(
            "the tokenizer has no merges; llama.cpp requires them for a BPE vocabulary",
            hint="train a byte-level BPE tokenizer with at least one merge",
        )
    return out


def _post_processor_adds(post: dict | None, token: str | None) -> tuple[bool, bool]:
    """(adds bos first, adds eos last) according to a TemplateProcessing post-processor."""
    if not post or token is None:
        return False, False
    if post.get("type") == "Sequence":
        for p in post.get("processors") or []:
            if p.get("type") == "TemplateProcessing":
                post = p
                break
    if post.get("type") != "TemplateProcessing":
        return False, False
    single = post.get("single") or []
    ids = [(s.get("SpecialToken") or {}).get("id") for s in single]
    return bool(ids and ids[0] == token), False


def _normalizer(norm: dict | None) -> str | None:
    """None, or "NFC" (the one normalizer edgellm reproduces); anything else is refused."""
    if not norm:
        return None
    kind = norm.get("type")
    if kind == "NFC":
        return "NFC"
    if kind == "Sequence":
        names = {_normalizer(n) for n in norm.get("normalizers") or []} - {None}
        return names.pop() if len(names) == 1 else None
    raise BuildError(
        f"tokenizer normalizer {kind!r} has no llama.cpp equivalent",
        hint="supported normalizers: none or NFC (as Qwen's tokenizers use)",
    )


def read_vocab(model_dir: str | Path, vocab_size: int) -> GGUFVocab:
    """Build the GGUF tokenizer fields from ``model_dir``: ``tokenizer.model`` (sentencepiece) if
    present, else ``tokenizer.json`` (byte-level BPE); plus tokenizer_config.json."""
    from edgellm.pipeline.tokenizer import chat_template_of, read_tokenizer_config

    model_dir = Path(model_dir)
    tcfg = read_tokenizer_config(model_dir)
    template = chat_template_of(model_dir)
    if (model_dir / "tokenizer.model").is_file():
        from edgellm.pipeline.export.gguf_spm import read_spm_vocab

        return read_spm_vocab(model_dir, vocab_size, tcfg, template)
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise BuildError(
            f"no tokenizer.json or tokenizer.model in {model_dir}",
            hint="the model directory needs the tokenizer it was trained with",
        )
    try:
        tj = json.loads(tok_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BuildError(f"{tok_path}: unreadable ({e})", hint="copy the tokenizer file again") from e
    return _bpe_vocab(tj, tcfg, template, vocab_size)


def _bpe_vocab(tj: dict, tcfg: dict, template: str | None, vocab_size: int) -> GGUFVocab:

    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise BuildError(
            f"tokenizer model {model.get('type')!r} is not BPE",
            hint="export supports byte-level BPE tokenizer.json or a sentencepiece tokenizer.model",
        )
    normalizer = _normalizer(tj.get("normalizer"))
    pre = _pre_tokenizer_name(tj.get("pre_tokenizer"))

    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {a["content"]: a for a in tj.get("added_tokens") or []}
    for content, a in added.items():
        vocab[content] = int(a["id"])
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise BuildError(
            f"tokenizer has {n} tokens but the model's embedding has {vocab_size} rows",
            hint="the tokenizer does not belong to this model",
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    seen = set()
    for tok, i in vocab.items():
        if i in seen:
            raise BuildError(f"token id {i} appears twice in tokenizer.json", hint="the tokenizer file is corrupt")
        seen.add(i)
        tokens[i] = tok
        types[i] = NORMAL
    specials: dict[str, int] = {}
    for content, a in added.items():
        i = int(a["id"])
        types[i] = CONTROL if a.get("special") else USER_DEFINED
        if a.get("special"):
            specials[content] = i

    def tid(name: str) -> int | None:
        content = _token_content(tcfg.get(name))
        if content is None:
            return None
        if content not in vocab:
            raise BuildError(
                f"{name} {content!r} of tokenizer_config.json is not in the vocabulary",
                hint="fix tokenizer_config.json",
            )
        return vocab[content]

    bos, eos, unk, pad = tid("bos_token"), tid("eos_token"), tid("unk_token"), tid("pad_token")
    if unk is not None:
        types[unk] = UNKNOWN
    post_bos, _ = _post_processor_adds(tj.get("post_processor"), _token_content(tcfg.get("bos_token")))
    add_bos = bool(tcfg.get("add_bos_token", post_bos))
    add_eos = bool(tcfg.get("add_eos_token", False))
    if add_bos and bos is None:
        raise BuildError("the tokenizer adds a BOS token but none is defined", hint="set bos_token")

    return GGUFVocab(
        model="gpt2",
        normalizer=normalizer,
        tokens=tokens,
        token_types=types,
        merges=_merges(model),
        pre=pre,
        bos_id=bos,
        eos_id=eos,
        unk_id=unk,
        pad_id=pad,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=template,
        special_tokens=specials,
    )

"""A sentencepiece ``tokenizer.model`` as llama.cpp's ``llama`` tokenizer (Llama 2, TinyLlama, Mistral v0.1).

llama.cpp's SPM tokenizer takes every piece with its score and type (normal, unknown, control,
user-defined, unused, byte ``<0xNN>``), prepends a space when the model has sentencepiece's dummy
prefix, and falls back to byte pieces for characters outside the vocabulary. Tokens added on top
of the sentencepiece vocabulary (``tokenizer_config.json`` ``added_tokens_decoder``) follow it; rows
of the embedding beyond the tokenizer are padded with unused ``[PAD{i}]`` tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgellm.errors import BuildError
from edgellm.pipeline.export.gguf_vocab import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, GGUFVocab


def _processor(path: Path) -> Any:
    try:
        import sentencepiece as spm
    except ImportError as e:
        raise BuildError(
            "reading tokenizer.model needs the sentencepiece package", hint="pip install 'edgellm[pipeline]'"
        ) from e
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise BuildError(
            f"{path}: unreadable sentencepiece model ({e})", hint="copy tokenizer.model again from the model's source"
        ) from e
    return sp


def _piece_type(sp: Any, i: int) -> int:
    if sp.IsUnknown(i):
        return UNKNOWN
    if sp.IsControl(i):
        return CONTROL
    if sp.IsUnused(i):
        return UNUSED
    if sp.IsByte(i):
        return BYTE
    return NORMAL


def _added_tokens(tcfg: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from ``added_tokens_decoder``."""
    out: dict[int, tuple[str, bool]] = {}
    for key, tok in (tcfg.get("added_tokens_decoder") or {}).items():
        if isinstance(tok, dict) and isinstance(tok.get("content"), str) and str(key).isdigit():
            out[int(key)] = (tok["content"], bool(tok.get("special", False)))
    return out


def read_spm_vocab(model_dir: Path, vocab_size: int, tcfg: dict[str, Any], template: str | None) -> GGUFVocab:
    """The GGUF tokenizer fields of ``model_dir/tokenizer.model``."""
    sp = _processor(model_dir / "tokenizer.model")
    n = sp.GetPieceSize()
    if n > vocab_size:
        raise BuildError(
            f"tokenizer.model has {n} pieces but the model's embedding has {vocab_size} rows",
            hint="the tokenizer does not belong to this model",
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(n):
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), float(sp.GetScore(i)), _piece_type(sp, i)
    for i, (content, special) in _added_tokens(tcfg).items():
        if i >= vocab_size:
            raise BuildError(
                f"added token {content!r} has id {i} beyond the embedding's {vocab_size} rows",
                hint="the tokenizer does not belong to this model",
            )
        tokens[i], scores[i] = content, -1000.0 if i >= n else scores[i]
        types[i] = CONTROL if special else USER_DEFINED
    ids = {t: i for i, t in enumerate(tokens)}

    def tid(name: str, default: int) -> int | None:
        value = tcfg.get(name)
        content = value.get("content") if isinstance(value, dict) else value
        if content is None:
            return default if default >= 0 else None
        if content not in ids:
            raise BuildError(
                f"{name} {content!r} of tokenizer_config.json is not in the vocabulary",
                hint="fix tokenizer_config.json",
            )
        return ids[content]

    bos, eos = tid("bos_token", sp.bos_id()), tid("eos_token", sp.eos_id())
    unk, pad = tid("unk_token", sp.unk_id()), tid("pad_token", sp.pad_id())
    add_bos = bool(tcfg.get("add_bos_token", True))
    if add_bos and bos is None:
        raise BuildError("the tokenizer adds a BOS token but none is defined", hint="set bos_token")
    pieces = sp.EncodeAsPieces("x")
    dummy_prefix = bool(pieces) and pieces[0].startswith("\u2581")
    first_only = dummy_prefix and _prepend_scheme(model_dir, tcfg) == "first"
    return GGUFVocab(
        model="llama",
        pre="default",
        tokens=tokens,
        token_types=types,
        merges=[],
        scores=scores,
        bos_id=bos,
        eos_id=eos,
        unk_id=unk,
        pad_id=pad,
        add_bos=add_bos,
        add_eos=bool(tcfg.get("add_eos_token", False)),
        chat_template=template,
        special_tokens={tokens[i]: i for i in range(vocab_size) if types[i] == CONTROL},
        add_space_prefix=dummy_prefix and not first_only,
        space_prefix="first" if first_only else None,
    )


def _prepend_scheme(model_dir: Path, tcfg: dict[str, Any]) -> str:
    """Where the Hugging Face tokenizer puts the dummy-prefix space: "always" (before every text
    fragment, also after a special token: llama.cpp's add_space_prefix) or "first" (only at the
    start of the text: non-legacy Llama tokenizers, ``legacy: false``)."""
    import json

    tj_path = model_dir / "tokenizer.json"
    if tj_path.is_file():
        try:
            pre = json.loads(tj_path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
        except (OSError, ValueError):
            pre = {}
        parts = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
        for part in parts:
            if isinstance(part, dict) and part.get("type") == "Metaspace":
                return str(part.get("prepend_scheme", "always"))
        return "always"  # legacy tokenizer.json: a Prepend normalizer
    return "first" if tcfg.get("legacy") is False else "always"

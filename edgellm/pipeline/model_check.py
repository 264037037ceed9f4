"""What a build checks about a model directory before any work starts.

    check_model_dir(model_dir) -> facts   (family, tokenizer, chat template, warnings)

Refuses (``BuildError``, with a hint) a family outside :mod:`edgellm.runtime.families`, a directory
without a tokenizer, and a chat template that does not compile; warns when the model has no chat
template (its chat endpoint will be refused: completions only). No torch here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgellm.errors import BuildError
from edgellm.pipeline.config import ModelConfig
from edgellm.pipeline.tokenizer import chat_template_of
from edgellm.runtime.chat import EDGELLM_CHAT_TEMPLATE, ChatTemplate, TemplateError

log = logging.getLogger(__name__)


def check_model_dir(model_dir: str | Path) -> dict[str, Any]:
    """The facts a build report states about ``model_dir``; raises on what cannot be served right."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise BuildError(
            f"{model_dir} is not a model directory (no config.json)",
            hint="pass the directory written by `edgellm train` or an HF save_pretrained checkpoint",
        )
    cfg = ModelConfig.from_file(model_dir / "config.json")
    if (model_dir / "tokenizer.model").is_file():
        tokenizer = "tokenizer.model (sentencepiece)"
    elif (model_dir / "tokenizer.json").is_file():
        tokenizer = "tokenizer.json"
    else:
        raise BuildError(
            f"{model_dir} has no tokenizer.json or tokenizer.model",
            hint="copy the tokenizer files that came with the checkpoint into the directory",
        )
    template = chat_template_of(model_dir)
    warnings = []
    if template is None:
        chat = "none"
        warnings.append(
            "the model has no chat template: devices will refuse /v1/chat/completions "
            "(completions work); add chat_template to tokenizer_config.json for chat"
        )
    elif template == EDGELLM_CHAT_TEMPLATE:
        chat = "edgellm"
    else:
        chat = "model"
        try:
            ChatTemplate(template, {}, ())
        except TemplateError as e:
            raise BuildError(f"{model_dir}: {e}", hint="fix chat_template in tokenizer_config.json") from e
    for w in warnings:
        log.warning("%s: %s", model_dir.name, w)
    return {
        "family": cfg.model_type,
        "architecture": cfg.family.hf_class,
        "tokenizer": tokenizer,
        "chat_template": chat,
        "warnings": warnings,
    }

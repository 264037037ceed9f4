"""Chat prompts: a model's own jinja chat template, rendered as transformers renders it.

A model that ships a chat template (``tokenizer_config.json`` ``chat_template``, or
``chat_template.jinja``; carried in the GGUF's ``tokenizer.chat_template`` and in the ONNX
metadata) is prompted with it: :class:`ChatTemplate` renders it in jinja2's immutable sandbox with
the globals and filters transformers gives templates (``raise_exception``, ``strftime_now``,
``tojson`` without HTML escaping, ``trim_blocks``/``lstrip_blocks``, loop controls) and the
special tokens as variables, then tokenizes the text with special-token parsing and without adding
bos, exactly as ``apply_chat_template(..., add_generation_prompt=True)`` does.

One difference, on purpose: when a message's text contains the text of one of the model's control
tokens (``<|im_end|>``, ``</s>`` ...), that text stays text. The template is then rendered with a
placeholder in place of each message content and the contents are tokenized without special-token
parsing, so a user cannot close their turn or impersonate another role.

:data:`EDGELLM_CHAT_TEMPLATE` is the template of models edgellm trained; those keep the
token-level role markers of :meth:`edgellm.runtime.base.Runtime.chat_token_ids`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from edgellm.errors import GenerationError

#: The chat template of models edgellm trains (role markers are special tokens of its tokenizer).
EDGELLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: use system, user or assistant') }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

MAX_TEMPLATE_CHARS = 200_000
_PLACEHOLDER = re.compile("\ue000([0-9]+)\ue001")

Tokenize = Callable[[str, bool], list[int]]  # (text, parse_special) -> ids, never adding bos


class TemplateError(GenerationError, ValueError):
    """The chat prompt cannot be built: the template refused the messages (its own
    ``raise_exception``), failed, or the model has no chat template. A ValueError: the API answers 400."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(
            message,
            hint=hint
            or "check the messages against the model's chat template (roles, order), or use the completions endpoint",
        )


def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):  # no underscore attributes: nothing reaches CPython internals
        def __setitem__(self, name: str, value: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")
            super().__setitem__(name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"the model's chat template does not compile: {e}") from e


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


class ChatTemplate:
    """A model's chat template with the special tokens it may refer to."""

    def __init__(self, template: str, special_tokens: dict[str, str], control_texts: Iterable[str]) -> None:
        if len(template) > MAX_TEMPLATE_CHARS:
            raise TemplateError(f"chat template of {len(template)} characters (limit {MAX_TEMPLATE_CHARS})")
        self.source = template
        self._template = _compile(template)
        self.special_tokens = dict(special_tokens)
        self.control_texts = tuple(sorted({t for t in control_texts if t}, key=len, reverse=True))

    def render(
        self, messages: Sequence[dict], *, add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        import jinja2

        try:
            return str(
                self._template.render(
                    messages=[dict(m) for m in messages],
                    tools=tools,
                    add_generation_prompt=add_generation_prompt,
                    **self.special_tokens,
                )
            )
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"the model's chat template refused the messages: {e}") from e
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise TemplateError(f"the model's chat template failed on these messages: {e}") from e

    def has_control_text(self, messages: Sequence[dict]) -> bool:
        return any(c in s for m in messages for s in _strings(m) for c in self.control_texts)

    def token_ids(
        self,
        tokenize: Tokenize,
        messages: Sequence[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> list[int]:
        """Ids of the rendered prompt (see the module docstring for text that looks like control tokens)."""
        if not self.has_control_text(messages):
            return tokenize(self.render(messages, add_generation_prompt=add_generation_prompt, tools=tools), True)
        for m in messages:
            if any(c in s for k, v in m.items() if k != "content" for s in _strings(v) for c in self.control_texts):
                raise TemplateError("a message field other than content contains a control token's text")
        contents = [m.get("content") for m in messages]
        masked = [
            {**m, "content": f"\ue000{i}\ue001"} if isinstance(m.get("content"), str) else m
            for i, m in enumerate(messages)
        ]
        text = self.render(masked, add_generation_prompt=add_generation_prompt, tools=tools)
        ids: list[int] = []
        pos = 0
        for hit in _PLACEHOLDER.finditer(text):
            i = int(hit.group(1))
            content = contents[i] if i < len(contents) else None
            if not isinstance(content, str):
                raise TemplateError("the chat template rewrote a message placeholder")
            ids += tokenize(text[pos : hit.start()], True) if hit.start() > pos else []
            ids += tokenize(content, False) if content else []
            pos = hit.end()
        if pos < len(text):
            ids += tokenize(text[pos:], True)
        return ids

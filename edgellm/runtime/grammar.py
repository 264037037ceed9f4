"""Structured output: llama.cpp grammars (GBNF) enforced during sampling.

- :func:`grammar_for_response_format` turns an OpenAI ``response_format`` (``json_object``, or
  ``json_schema`` with its ``schema``) into a GBNF grammar with llama-cpp-python's own JSON-schema
  converter (the one llama-server uses);
- :class:`LlamaGrammar` is a :class:`edgellm.runtime.base.Constraint` over llama.cpp's grammar
  sampler: before each draw it sets the logits of every token the grammar forbids to -inf, after
  it advances the grammar by the chosen token. End-of-generation is allowed only once the grammar
  has accepted a complete text, so a finished generation always parses.

Schemas and grammars come from API clients: both are bounded in size, and any failure to convert
or parse is a :class:`ValueError` the API turns into 400.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

import numpy as np

from edgellm.runtime.base import Constraint

MAX_SCHEMA_CHARS = 32_768
MAX_GRAMMAR_CHARS = 65_536


def grammar_for_response_format(response_format: Any) -> str | None:
    """The GBNF grammar for an OpenAI ``response_format`` (None for ``{"type": "text"}``)."""
    from llama_cpp import llama_grammar

    if not isinstance(response_format, dict):
        raise ValueError("response_format must be an object")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema = response_format.get("schema")  # llama-server's extension; plain JSON otherwise
        if schema is None:
            return str(llama_grammar.JSON_GBNF)
        if not isinstance(schema, dict):
            raise ValueError("response_format.schema must be an object (a JSON schema)")
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format.json_schema must be an object with a 'schema' object")
        schema = spec["schema"]
    else:
        raise ValueError(f"response_format type {kind!r} is not supported (use text, json_object or json_schema)")
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        raise ValueError(f"JSON schema of {len(text)} characters exceeds {MAX_SCHEMA_CHARS}")
    try:
        grammar = llama_grammar.json_schema_to_gbnf(text)
    except (ValueError, KeyError, TypeError, AssertionError, NotImplementedError, RecursionError) as e:
        raise ValueError(f"the JSON schema cannot be turned into a grammar: {e}") from e
    return str(grammar)


class LlamaGrammar(Constraint):
    """llama.cpp's grammar sampler for one generation over ``vocab`` (a ``llama_vocab`` pointer)."""

    def __init__(self, llama_cpp: Any, vocab: Any, n_vocab: int, grammar: str) -> None:
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"grammar of {len(grammar)} characters exceeds {MAX_GRAMMAR_CHARS}")
        self._lib = llama_cpp
        self._smpl = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not self._smpl:
            raise ValueError("the grammar does not parse (llama.cpp GBNF)")
        self._data = (llama_cpp.llama_token_data * n_vocab)()
        self._view = np.ctypeslib.as_array(self._data)
        self._view["id"] = np.arange(n_vocab, dtype=np.int32)
        self._array = llama_cpp.llama_token_data_array(
            data=ctypes.cast(self._data, llama_cpp.llama_token_data_p), size=n_vocab, selected=-1, sorted=False
        )

    def apply(self, logits: np.ndarray) -> np.ndarray:
        view = self._view
        view["id"] = np.arange(view.shape[0], dtype=np.int32)
        view["logit"] = np.asarray(logits, dtype=np.float32).reshape(-1)
        view["p"] = 0.0
        self._array.size = view.shape[0]
        self._array.selected = -1
        self._array.sorted = False
        self._lib.llama_sampler_apply(self._smpl, ctypes.byref(self._array))
        out = np.full(view.shape[0], -np.inf, dtype=np.float32)
        n = int(self._array.size)
        kept = np.ctypeslib.as_array(
            ctypes.cast(self._array.data, ctypes.POINTER(self._lib.llama_token_data)), shape=(n,)
        )
        out[kept["id"]] = kept["logit"]
        return out

    def accept(self, token: int) -> None:
        self._lib.llama_sampler_accept(self._smpl, int(token))

    def close(self) -> None:
        if self._smpl:
            self._lib.llama_sampler_free(self._smpl)
            self._smpl = None

"""The local API on real models of every family: the model's own chat template, structured output
(response_format through a llama.cpp grammar), logprobs, and refusal of what is not implemented.

A real uvicorn server and the agent's real Engine (tests/test_agent_api.py ``Server``) serve a real
llama.cpp or onnxruntime model; a subclass of the runtime records the prompt ids it is given."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
from fixtures_models import FAMILY_SPECS, make_family
from test_agent_api import Server

from edgellm.runtime.llamacpp import LlamaCppRuntime

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["color", "size"],
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["small", "large"]},
    },
}


class RecordingLlamaCpp(LlamaCppRuntime):
    """The real llama.cpp runtime, remembering the prompt ids of each generation."""

    prompts: list[list[int]]

    def generate(self, prompt: str | Sequence[int], params):
        self.__dict__.setdefault("prompts", []).append(list(prompt) if not isinstance(prompt, str) else [])
        return super().generate(prompt, params)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """name -> HF model dir (its F32 GGUF is ``<dir>/../model.gguf``)."""
    import torch

    from edgellm.pipeline.export.gguf import export_gguf

    torch.set_num_threads(1)
    out = {}
    for name in FAMILY_SPECS:
        d = make_family(tmp_path_factory.mktemp(name) / "model", name)
        export_gguf(d, d.parent / "model.gguf", "gguf-f32")
        out[name] = d
    return out


def _serve(tmp_path: Path, runtime) -> Server:
    from agent.engine import ModelHandle

    srv = Server(tmp_path)
    srv.engine.swap(ModelHandle(runtime, "tiny", "1.0.0", "A", runtime.kind))
    return srv


def _post(srv: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, headers=srv.headers, json={"model": "tiny", **body}, timeout=120)


@pytest.mark.parametrize("name", list(FAMILY_SPECS))
def test_chat_prompt_ids_equal_apply_chat_template(models, tmp_path, name):
    from transformers import AutoTokenizer

    d = models[name]
    msgs = [
        {"role": "system", "content": "You control a robot arm."},
        {"role": "user", "content": "Grip the café mug 🤖, then report 3 readings."},
    ]
    rt = RecordingLlamaCpp.load(d.parent / "model.gguf")
    srv = _serve(tmp_path, rt)
    try:
        r = _post(srv, "/v1/chat/completions", {"messages": msgs, "max_tokens": 3})
        assert r.status_code == 200, r.text
    finally:
        srv.close()
        rt.close()
    want = AutoTokenizer.from_pretrained(str(d)).apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    want = list(want if isinstance(want, list) else want["input_ids"])
    assert rt.prompts[-1] == want
    assert r.json()["usage"]["prompt_tokens"] == len(want)


def _valid(text: str) -> bool:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    props = SCHEMA["properties"]
    return (
        isinstance(obj, dict)
        and set(obj) == {"color", "size"}
        and obj["color"] in props["color"]["enum"]
        and obj["size"] in props["size"]["enum"]
    )


def test_json_schema_response_format_always_parses(models, tmp_path):
    rt = LlamaCppRuntime.load(models["qwen2"].parent / "model.gguf")
    srv = _serve(tmp_path, rt)
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}}
    try:
        texts = []
        for seed in range(20):
            r = _post(
                srv,
                "/v1/chat/completions",
                {
                    "messages": [{"role": "user", "content": "Pick a color and a size."}],
                    "max_tokens": 400,
                    "temperature": 1.0,
                    "seed": seed,
                    "response_format": fmt,
                },
            )
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "stop"
            texts.append(choice["message"]["content"])
        free = _post(
            srv,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Pick a color and a size."}],
                "max_tokens": 40,
                "seed": 1,
                "temperature": 1.0,
            },
        )
    finally:
        srv.close()
        rt.close()
    assert all(_valid(t) for t in texts), [t for t in texts if not _valid(t)]
    assert len(set(texts)) > 1  # sampled, not a canned answer
    assert not _valid(free.json()["choices"][0]["message"]["content"])  # the grammar made the difference


def test_json_object_and_logprobs(models, tmp_path):
    rt = LlamaCppRuntime.load(models["llama3"].parent / "model.gguf")
    srv = _serve(tmp_path, rt)
    try:
        r = _post(
            srv,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "status?"}],
                "max_tokens": 300,
                "seed": 3,
                "temperature": 0.7,
                "response_format": {"type": "json_object"},
                "logprobs": True,
                "top_logprobs": 3,
            },
        )
        comp = _post(srv, "/v1/completions", {"prompt": "The robot", "max_tokens": 4, "logprobs": 2})
        with httpx.stream(
            "POST",
            srv.url + "/v1/chat/completions",
            headers=srv.headers,
            timeout=60,
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3,
                "stream": True,
                "logprobs": True,
                "top_logprobs": 1,
            },
        ) as s:
            chunks = [
                json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"
            ]
    finally:
        srv.close()
        rt.close()
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    content = choice["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"]
    for e in content:
        assert math.isfinite(e["logprob"]) and e["logprob"] <= 0 and len(e["top_logprobs"]) == 3
        assert [t["logprob"] for t in e["top_logprobs"]] == sorted(
            (t["logprob"] for t in e["top_logprobs"]), reverse=True
        )
    assert "".join(bytes(e["bytes"]).decode("utf-8", "replace") for e in content) == choice["message"]["content"]
    lp = comp.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert all(len(t) <= 2 for t in lp["top_logprobs"])  # two alternatives (fewer if their texts coincide)
    assert comp.json()["choices"][0]["text"] == "".join(lp["tokens"])
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert len(streamed) == 3 and all(len(x["content"][0]["top_logprobs"]) == 1 for x in streamed)


@pytest.mark.parametrize(
    "body",
    [
        {"tools": [{"type": "function", "function": {"name": "grip", "parameters": {"type": "object"}}}]},
        {"tool_choice": "required"},
        {"logit_bias": {"5": 10}},
        {"presence_penalty": 0.5},
        {"response_format": {"type": "yaml"}},
        {"response_format": {"type": "json_schema", "json_schema": {}}},
        {"top_logprobs": 2},
    ],
)
def test_unimplemented_parameters_are_refused(models, tmp_path, body):
    rt = LlamaCppRuntime.load(models["qwen3"].parent / "model.gguf")
    srv = _serve(tmp_path, rt)
    try:
        r = _post(
            srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
        )
        ok = _post(
            srv,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
                "tools": [],
                "tool_choice": "none",
                "presence_penalty": 0,
            },
        )
    finally:
        srv.close()
        rt.close()
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] in ("unsupported_parameter", "invalid_request")
    assert r.json()["error"]["param"] == next(iter(body))
    assert ok.status_code == 200, ok.text


@pytest.mark.slow
def test_onnx_model_refuses_response_format_but_gives_logprobs(models, tmp_path):
    from edgellm.pipeline.export.onnx import export_onnx
    from edgellm.runtime.onnx import OnnxRuntime

    d = models["qwen2"]
    out = d.parent / "onnx" / "model.onnx"
    out.parent.mkdir()
    export_onnx(d, out, evaluate=False)
    rt = OnnxRuntime.load(out)
    srv = _serve(tmp_path, rt)
    try:
        r = _post(
            srv,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
                "response_format": {"type": "json_object"},
            },
        )
        lp = _post(
            srv,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True, "top_logprobs": 2},
        )
    finally:
        srv.close()
        rt.close()
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    assert r.json()["error"]["param"] == "response_format"
    assert lp.status_code == 200 and len(lp.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2


def test_hostile_values_of_the_new_parameters_never_500(models, tmp_path):
    from test_agent_api import HOSTILE_VALUES

    rt = LlamaCppRuntime.load(models["qwen3"].parent / "model.gguf")
    srv = _serve(tmp_path, rt)
    deep: dict = {"type": "object", "properties": {}}
    node = deep
    for _ in range(200):
        node["properties"]["x"] = {"type": "object", "properties": {}}
        node = node["properties"]["x"]
    extra = [
        {"type": "json_schema", "json_schema": {"schema": deep}},
        {"type": "json_object", "schema": "x"},
        {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}},
        {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(" * 50}}},
    ]
    try:
        statuses = {}
        for field in (
            "response_format",
            "tools",
            "tool_choice",
            "logprobs",
            "top_logprobs",
            "logit_bias",
            "presence_penalty",
            "echo",
        ):
            for v in [*HOSTILE_VALUES, *(extra if field == "response_format" else [])]:
                r = httpx.post(
                    srv.url + "/v1/chat/completions",
                    headers=srv.headers,
                    timeout=60,
                    content=json.dumps(
                        {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], field: v},
                        allow_nan=True,
                    ),
                )
                statuses[(field, repr(v)[:40])] = r.status_code
    finally:
        srv.close()
        rt.close()
    assert all(s < 500 for s in statuses.values()), {k: s for k, s in statuses.items() if s >= 500}

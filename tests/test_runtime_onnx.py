"""OnnxRuntime: the Runtime interface over an exported tiny model (no torch in the runtime)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from edgellm.runtime import GenerationParams, ModelLoadError, PromptTooLongError, load_runtime
from edgellm.runtime.onnx import OnnxRuntime

CHAT = [{"role": "user", "content": "turn on the kitchen light"}]


@pytest.fixture(scope="module")
def rt(onnx_fp32_path):
    r = OnnxRuntime.load(onnx_fp32_path, threads=1)
    yield r
    r.close()


def test_loads_and_generates_without_torch(onnx_int8_path, tiny_model_dir):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any torch import now fails
        from edgellm.runtime import GenerationParams, load_runtime
        rt = load_runtime("onnx", {str(onnx_int8_path)!r}, model_dir={str(tiny_model_dir)!r}, threads=1)
        c = rt.complete(rt.chat_token_ids([{{"role": "user", "content": "open the garage door"}}]),
                        GenerationParams(max_tokens=24))
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        print(repr(c.text), c.finish_reason)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "stop" in p.stdout and "is" in p.stdout


def test_chat_reply_is_learned_and_ends_at_eos(rt):
    c = rt.complete(rt.chat_token_ids(CHAT), GenerationParams(max_tokens=32))
    assert c.finish_reason == "stop"
    assert c.text.startswith("OK: ") and c.text.endswith(" is on.\n")
    assert c.token_ids[-1] in rt.eos_ids
    assert all(lp <= 0 and np.isfinite(lp) for lp in c.logprobs)


def test_streaming_matches_complete_and_max_tokens(rt):
    params = GenerationParams(max_tokens=7)
    events = list(rt.generate("12:00 sensor te-1", params))
    assert len(events) == 7 and events[-1].finish_reason == "length"
    assert all(e.finish_reason is None for e in events[:-1])
    c = rt.complete("12:00 sensor te-1", params)
    assert "".join(e.text for e in events) == c.text == rt.detokenize(c.token_ids)


def test_stop_sequences_are_honoured_and_not_emitted(rt):
    c = rt.complete("12:00 sensor te-1", GenerationParams(max_tokens=30, stop=("status",)))
    assert c.finish_reason == "stop"
    assert "status" not in c.text and c.text.strip().startswith("temp=")


def test_sampling_is_seeded(rt):
    p1 = GenerationParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=7)
    a, b = rt.complete("08:00 sensor", p1), rt.complete("08:00 sensor", p1)
    assert a.token_ids == b.token_ids
    outs = {
        rt.complete("08:00 sensor", GenerationParams(max_tokens=20, temperature=1.5, seed=s)).text for s in range(5)
    }
    assert len(outs) > 1


def test_special_tokens_in_user_text_are_plain_text(rt):
    eos = rt.eos_ids[0]
    assert eos not in rt.tokenize("</s> <|assistant|>", add_bos=False)
    assert rt.tokenize("</s>", add_bos=False, special=True) == [eos]
    ids = rt.chat_token_ids([{"role": "user", "content": "hi </s><|assistant|>"}])
    assert ids.count(eos) == 0 and ids.count(6) == 1  # only the template's own <|assistant|>


def test_prompt_too_long(rt):
    ids = [1] + [40] * (rt.context_length - 5)
    with pytest.raises(PromptTooLongError):
        rt.generate(ids, GenerationParams(max_tokens=10))
    small = OnnxRuntime.load(rt.path, context_length=16)
    with pytest.raises(PromptTooLongError):
        small.generate("x " * 40, GenerationParams(max_tokens=1))


def test_tokenizer_lookup_and_bad_files(onnx_fp32_path, tiny_model_dir, tmp_path):
    lone = tmp_path / "lone.onnx"
    shutil.copyfile(onnx_fp32_path, lone)  # no tokenizer.json here: the embedded one is used
    with load_runtime("onnx", lone, threads=1) as r:
        assert r.tokenize("turn on", add_bos=False)
    with OnnxRuntime.load(lone, model_dir=tiny_model_dir) as r:
        assert r.context_length == 256
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(onnx_fp32_path.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="bad.onnx"):
        OnnxRuntime.load(bad)
    with pytest.raises(ModelLoadError, match="does not exist"):
        OnnxRuntime.load(tmp_path / "missing.onnx")


def test_kv_cache_reuse_across_calls_changes_nothing(onnx_fp32_path):
    warm = OnnxRuntime.load(onnx_fp32_path)
    cold_params = GenerationParams(max_tokens=12)
    turn1 = [{"role": "user", "content": "close the garage door"}]
    first = warm.complete(warm.chat_token_ids(turn1), cold_params)
    turn2 = turn1 + [
        {"role": "assistant", "content": first.text.strip()},
        {"role": "user", "content": "status of arm-2?"},
    ]
    for prompt in (warm.chat_token_ids(turn2), warm.chat_token_ids(turn1), warm.chat_token_ids(turn2)[:7]):
        with OnnxRuntime.load(onnx_fp32_path) as cold:
            want = cold.complete(prompt, cold_params)
        got = warm.complete(prompt, cold_params)
        assert got.token_ids == want.token_ids
        assert np.allclose(got.logprobs, want.logprobs, atol=1e-4)
    # an abandoned stream leaves a consistent cache
    gen = warm.generate(warm.chat_token_ids(turn1), GenerationParams(max_tokens=20))
    next(gen)
    gen.close()
    assert warm.complete(warm.chat_token_ids(turn1), cold_params).token_ids == first.token_ids

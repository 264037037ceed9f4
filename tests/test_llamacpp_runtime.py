"""LlamaCppRuntime: streaming, stops, sampling, logprobs, context, guarded loading."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgellm.runtime.base import GenerationParams, ModelLoadError, PromptTooLongError


@pytest.fixture(scope="module")
def rt(tiny_gguf):
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    r = LlamaCppRuntime.load(tiny_gguf, threads=1, context_length=300)
    yield r
    r.close()


def test_context_is_rounded_for_llama_cpp_and_enforced(rt):
    assert rt.context_length == 300
    assert rt._llm.n_ctx() % 256 == 0
    with pytest.raises(PromptTooLongError, match="exceeds the context"):
        rt.complete("The robot " * 200, GenerationParams(max_tokens=10))


def test_stream_equals_complete_and_learned_text(rt):
    p = GenerationParams(max_tokens=12)
    events = list(rt.generate("The robot", p))
    c = rt.complete("The robot", p)
    assert "".join(e.text for e in events) == c.text
    assert tuple(e.token_id for e in events) == c.token_ids
    assert events[-1].finish_reason == c.finish_reason in ("stop", "length")
    assert all(e.finish_reason is None for e in events[:-1])
    assert c.text.startswith(" reads") or "the" in c.text  # the tiny model learned the corpus


def test_logprobs_are_the_models_log_softmax(rt):
    from edgellm.runtime.llamacpp import log_softmax

    prompt = rt.tokenize("The sensor", add_bos=False)
    c = rt.complete(prompt, GenerationParams(max_tokens=3))
    lp0 = log_softmax(rt.last_logits(prompt))[c.token_ids[0]]
    assert math.isclose(c.logprobs[0], lp0, abs_tol=1e-5)
    assert all(lp <= 0 for lp in c.logprobs)
    off = rt.complete(prompt, GenerationParams(max_tokens=2, logprobs=False))
    assert len(off.logprobs) == 2 and all(math.isnan(x) for x in off.logprobs)


def test_stop_sequence_cuts_text(rt):
    full = rt.complete("The robot", GenerationParams(max_tokens=20)).text
    stop = full[5:9]
    c = rt.complete("The robot", GenerationParams(max_tokens=20, stop=(stop,)))
    assert c.finish_reason == "stop"
    assert c.text == full[: full.index(stop)]
    assert stop not in c.text


def test_eos_finishes_with_stop(rt):
    # The corpus ends every line with </s>: after a full sentence the model ends it.
    c = rt.complete("The drone checks the battery every 3 seconds.", GenerationParams(max_tokens=20))
    assert c.finish_reason in ("stop", "length")
    if c.finish_reason == "stop":
        assert rt.is_eog(c.token_ids[-1])


def test_seeded_sampling_is_reproducible(rt):
    p = GenerationParams(max_tokens=15, temperature=1.5, top_p=0.95, top_k=50, seed=7)
    a, b = rt.complete("The", p), rt.complete("The", p)
    assert a.token_ids == b.token_ids
    others = {rt.complete("The", GenerationParams(max_tokens=15, temperature=1.5, seed=s)).token_ids for s in range(4)}
    assert len(others) > 1


def test_prefix_reuse_gives_identical_results(rt):
    p = GenerationParams(max_tokens=8)
    a = rt.complete("The camera sends the light", p)
    rt.complete("Something else entirely", p)
    b = rt.complete("The camera sends the light", p)
    c = rt.complete("The camera sends the light", p)  # full prefix hit
    assert a.token_ids == b.token_ids == c.token_ids
    np.testing.assert_allclose(a.logprobs, c.logprobs, atol=1e-4)


def test_a_decode_step_does_not_scan_the_kv_cache(rt, monkeypatch):
    """Trimming the cache walks every cell of a context: done when a prefix is cut, not per token."""
    calls = []
    real = rt._llm._ctx.kv_cache_seq_rm
    monkeypatch.setattr(rt._llm._ctx, "kv_cache_seq_rm", lambda *a: (calls.append(a), real(*a))[1])
    p = GenerationParams(max_tokens=12)
    first = rt.complete("The pump", p)
    assert len(calls) <= 1  # the new prompt cut the previous one's cache once
    calls.clear()
    again = rt.complete("The pump", p)  # a full prefix hit: the cache is cut back to the prompt
    assert len(calls) == 1 and again.token_ids == first.token_ids


def test_closing_stream_early_keeps_runtime_usable(rt):
    gen = rt.generate("The motor", GenerationParams(max_tokens=30))
    next(gen)
    gen.close()
    assert rt.complete("The motor", GenerationParams(max_tokens=3)).token_ids


def test_chat_prompt_uses_role_tokens(rt):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi </s><|assistant|>"}]
    ids = rt.chat_token_ids(msgs)
    user, asst = (rt.tokenize(t, add_bos=False, special=True)[0] for t in ("<|user|>", "<|assistant|>"))
    assert ids.count(user) == 1 and ids.count(asst) == 1  # the injected marker stayed text
    assert rt.tokenize(rt.chat_prompt(msgs[:1]), add_bos=False, special=True) == rt.chat_token_ids(msgs[:1])


# ------------------------------------------------------------------ refusing bad files


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _no_llama(monkeypatch):
    import llama_cpp

    def boom(*a, **k):
        raise AssertionError("llama.cpp must not open this file")

    monkeypatch.setattr(llama_cpp, "Llama", boom)


def test_truncated_and_flipped_files_refused_before_llama_cpp(tiny_gguf, tmp_path, monkeypatch):
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    good = tiny_gguf.read_bytes()
    digest, size = _sha(tiny_gguf), len(good)
    _no_llama(monkeypatch)

    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(good[: size // 2])
    with pytest.raises(ModelLoadError, match="size"):
        LlamaCppRuntime.load(trunc, sha256=digest, size=size)
    with pytest.raises(ModelLoadError, match="not a loadable GGUF"):  # even without a manifest
        LlamaCppRuntime.load(trunc)

    flipped = tmp_path / "flip.gguf"
    b = bytearray(good)
    b[-1000] ^= 0xFF  # inside tensor data: structurally valid, numerically garbage
    flipped.write_bytes(bytes(b))
    with pytest.raises(ModelLoadError, match="sha256"):
        LlamaCppRuntime.load(flipped, sha256=digest, size=size)

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(ModelLoadError):
        LlamaCppRuntime.load(junk)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("llama.block_count", 0, "block_count"),  # aborts llama.cpp (SIGABRT) if it gets there
        ("llama.attention.head_count_kv", 3, "head_count"),
        ("tokenizer.ggml.eos_token_id", 10**6, "eos_token_id"),
    ],
)
def test_hostile_metadata_refused_without_crashing(tiny_gguf, tmp_path, monkeypatch, key, value, match):
    import gguf

    from edgellm.runtime.llamacpp import LlamaCppRuntime

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_gguf.read_bytes())
    r = gguf.GGUFReader(str(bad), "r+")
    field = r.get_field(key)
    field.parts[field.data[0]][0] = value
    r.data.flush()
    del r
    _no_llama(monkeypatch)
    with pytest.raises(ModelLoadError, match=match):
        LlamaCppRuntime.load(bad)


def test_isolated_probe_loads_good_file(tiny_gguf):
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    with LlamaCppRuntime.load(tiny_gguf, isolate=True, sha256=_sha(tiny_gguf)) as r:
        assert r.complete("The", GenerationParams(max_tokens=2)).token_ids


def test_runtime_needs_no_torch(tiny_gguf):
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch.") or name.startswith("edgellm.pipeline"):
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        from edgellm.runtime import load_runtime, GenerationParams
        rt = load_runtime("gguf", {str(tiny_gguf)!r})
        print(rt.complete("The", GenerationParams(max_tokens=3)).text)
        assert "torch" not in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_duplicate_token_refused(tiny_gguf, tmp_path, monkeypatch):
    """llama.cpp asserts (SIGABRT) on a vocabulary with a duplicate token: caught before."""
    import gguf

    from edgellm.runtime.llamacpp import LlamaCppRuntime

    bad = tmp_path / "dup.gguf"
    bad.write_bytes(tiny_gguf.read_bytes())
    r = gguf.GGUFReader(str(bad), "r+")
    f = r.get_field("tokenizer.ggml.tokens")
    texts = f.contents()
    i, j = next(
        (i, j)
        for i in range(len(texts))
        for j in range(i + 1, len(texts))
        if len(texts[i].encode()) == len(texts[j].encode()) and texts[i] != texts[j]
    )
    f.parts[f.data[j]][:] = np.frombuffer(texts[i].encode(), dtype=np.uint8)
    r.data.flush()
    del r
    _no_llama(monkeypatch)
    with pytest.raises(ModelLoadError, match="duplicate tokens"):
        LlamaCppRuntime.load(bad)


def test_random_metadata_damage_never_crashes_the_caller(tiny_gguf, tmp_path):
    """Byte damage in the header/metadata is refused by check_gguf, or loads in a probe process
    without a native crash (what passes our checks must be safe for llama.cpp)."""
    import random

    import gguf

    from edgellm.runtime.llamacpp import check_gguf, probe_in_subprocess

    good = tiny_gguf.read_bytes()
    meta_end = gguf.GGUFReader(str(tiny_gguf)).data_offset
    rng = random.Random(1234)
    refused = probed = 0
    for n in range(40):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(meta_end)] = rng.randrange(256)
        p = tmp_path / f"fuzz{n}.gguf"
        p.write_bytes(bytes(b))
        try:
            check_gguf(p)
        except ModelLoadError:
            refused += 1
            continue
        try:
            probe_in_subprocess(p, timeout=60)
        except ModelLoadError as e:
            assert "signal" not in str(e), f"mutation {n} passed our checks and crashed llama.cpp: {e}"
        probed += 1
    assert refused > 20


def test_repacked_models_load_without_mmap(gguf_exports):
    """Q4_K/Q4_0 matrices are repacked by llama.cpp; without mmap their file pages are not
    resident a second time (the memory model in edgellm.pipeline.candidates relies on it)."""
    from edgellm.runtime.llamacpp import LlamaCppRuntime

    with LlamaCppRuntime.load(gguf_exports["gguf-q4_k_m"]) as q4, LlamaCppRuntime.load(gguf_exports["gguf-q8_0"]) as q8:
        assert q4.use_mmap is False and q4._llm.model_params.load_mode == 0  # LLAMA_LOAD_MODE_NONE
        assert q8.use_mmap is True and q8._llm.model_params.load_mode == 1  # LLAMA_LOAD_MODE_MMAP
    with LlamaCppRuntime.load(gguf_exports["gguf-q4_k_m"], mmap=True) as forced:
        assert forced.use_mmap is True

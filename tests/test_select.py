"""Selection rules on synthetic measurements (no models involved)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from edgellm.pipeline.candidates import Measurement, MemoryModel
from edgellm.pipeline.select import Budget, select

MIB = 2**20


def meas(fmt: str, weights_mib: float, kl: float, ppl: float, tps: float) -> Measurement:
    w = int(weights_mib * MIB)
    return Measurement(
        fmt=fmt,
        runtime=fmt.split("-")[0],
        artifact=f"/x/{fmt}",
        size_bytes=w,
        memory=MemoryModel(w, kv_bytes_per_position=1024, compute_base_bytes=MIB, compute_bytes_per_position=0),
        bytes_per_token=w,
        perplexity=ppl,
        reference_perplexity=10.0,
        kl_divergence=kl,
        top1_agreement=1 - kl,
        eval_tokens=100,
        decode_tokens_per_second=tps,
        efficiency=0.5,
        bandwidth_here_gbps=10.0,
        extra={"n_params": w // 2},
    )


CANDS = [
    meas("onnx-fp32", 400, 0.0, 10.0, 10),
    meas("gguf-f16", 200, 0.0001, 10.0, 20),
    meas("gguf-q8_0", 106, 0.001, 10.02, 40),
    meas("gguf-q4_k_m", 60, 0.02, 10.4, 70),
    meas("gguf-q4_0", 56, 0.04, 10.9, 75),
]


def profile(name="p", usable_mib=1000.0, runtimes=("llama.cpp", "onnxruntime"), bw=10.0, tps=1.0, ctx=1024):
    return SimpleNamespace(
        name=name,
        usable_ram_bytes=int(usable_mib * MIB),
        runtimes=frozenset(runtimes),
        bandwidth_gbps=bw,
        min_tokens_per_second=tps,
        context_length=ctx,
        threads=2,
    )


def test_roomy_profile_gets_least_loss():
    s = select(profile(), CANDS)
    assert s.chosen == "onnx-fp32"
    assert s.verdict("onnx-fp32").chosen
    assert "loses more" in s.verdict("gguf-q8_0").reasons[0]


def test_runtime_memory_and_speed_each_exclude():
    assert select(profile(runtimes=("llama.cpp",)), CANDS).chosen == "gguf-f16"
    s = select(profile(usable_mib=150), CANDS)
    assert s.chosen == "gguf-q8_0"
    assert "usable RAM is 150.0 MiB" in s.verdict("gguf-f16").reasons[0]
    # predicted tok/s = 0.5 * bw * 1e9 / bytes: with bw=0.2, only the Q4s reach 1 tok/s
    s = select(profile(bw=0.2), CANDS)
    assert s.chosen == "gguf-q4_k_m"
    assert "predicted" in s.verdict("gguf-q8_0").reasons[0]


def test_operator_budgets_and_pin():
    assert select(profile(), CANDS, Budget(pin_format="gguf-q4_0")).chosen == "gguf-q4_0"
    assert select(profile(runtimes=("llama.cpp",)), CANDS, Budget(min_tokens_per_second=30)).chosen == "gguf-q8_0"
    s = select(profile(usable_mib=80), CANDS, Budget(max_quality_loss=0.05))
    assert s.chosen == "gguf-q4_k_m"
    s = select(profile(usable_mib=80), CANDS, Budget(max_quality_loss=0.01))
    assert s.chosen is None and "max quality loss" in s.verdict("gguf-q4_k_m").reasons[0]


def test_headroom_is_applied():
    need = CANDS[3].memory.at(1024)["peak_bytes"] / MIB
    assert select(profile(usable_mib=need * 1.05), CANDS[3:4], Budget(headroom=0.10)).chosen is None
    assert select(profile(usable_mib=need * 1.05), CANDS[3:4], Budget(headroom=0.0)).chosen == "gguf-q4_k_m"


def test_mcu_is_refused_with_what_would_fit():
    mcu = profile(name="esp32", usable_mib=6, runtimes=(), tps=1.0, ctx=128)
    s = select(mcu, CANDS)
    assert s.chosen is None
    assert "no LLM runtime" in s.refusal
    assert "M parameters" in s.refusal and "gguf-q4_0" in s.refusal
    assert all(not v.eligible for v in s.verdicts)


@pytest.mark.parametrize("usable", [0.5, 0.9])
def test_nothing_fits_even_buffers(usable):
    s = select(profile(usable_mib=usable), CANDS)
    assert s.chosen is None and "no model of this architecture fits" in s.refusal


def test_context_is_capped_at_what_the_model_was_trained_for():
    m = meas("gguf-q8_0", 106, 0.001, 10.02, 40)
    m.extra["max_context_length"] = 256
    v = select(profile(ctx=4096), [m]).verdict("gguf-q8_0")
    assert v.memory["context_length"] == 256
    assert v.memory["kv_cache_bytes"] == 256 * 1024

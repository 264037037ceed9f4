"""The health check runs the real model in a child process and judges it against the budget."""

from __future__ import annotations

import json

import pytest
from fixtures_agent import AGENT_PROFILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slot(tmp_path_factory, agent_bundles):
    from edgellm.bundle import unpack

    d = tmp_path_factory.mktemp("health") / "slot"
    unpack(agent_bundles["bundles"]["1.0.0"], d)
    return d


def test_a_good_model_passes_and_is_measured(slot):
    from agent.health import HealthBudget, run_health_check

    report = run_health_check(slot, HealthBudget(min_tokens_per_second=1.0, max_memory_bytes=1 << 30))
    assert report["ok"], report
    assert report["tokens_per_second"] > 1.0 and 0 < report["memory_bytes"] < 1 << 30
    assert [g["ok"] for g in report["golden"]] == [True, True]


def test_speed_and_memory_over_budget_fail_with_reasons(slot):
    from agent.health import HealthBudget, run_health_check

    report = run_health_check(slot, HealthBudget(min_tokens_per_second=1e9, max_memory_bytes=1))
    assert not report["ok"]
    assert "below the budget" in report["reason"] and "over the budget" in report["reason"]


def test_a_model_that_cannot_load_fails_without_hurting_the_caller(slot, tmp_path):
    import shutil

    from agent.health import HealthBudget, run_health_check

    bad = tmp_path / "bad"
    shutil.copytree(slot, bad)
    art = bad / "model.gguf"
    art.write_bytes(art.read_bytes()[:200])  # truncated: llama.cpp must never see it in this process
    report = run_health_check(bad, HealthBudget())
    assert not report["ok"] and report["reason"]


def test_budget_is_the_stricter_of_bundle_and_profile():
    from agent.health import budget_for
    from edgellm.bundle import Manifest
    from edgellm.profiles import get_profile

    prof = get_profile(AGENT_PROFILE)
    m = Manifest(
        name="m",
        version="1",
        runtime="gguf",
        artifact="model.gguf",
        health={"min_tokens_per_second": 1.0, "max_memory_bytes": 1 << 40},
    )
    b = budget_for(m, prof, threads=1)
    assert b.min_tokens_per_second == prof.min_tokens_per_second
    assert b.max_memory_bytes == prof.usable_ram_bytes
    m.health = {"min_tokens_per_second": 50.0, "max_memory_bytes": 1 << 20}
    b = budget_for(m, prof)
    assert (b.min_tokens_per_second, b.max_memory_bytes) == (50.0, 1 << 20)


def _poison(slot, tmp_path, tensor: str = "output_norm.weight"):
    """A copy of the slot whose ``tensor`` (F32) is all NaN: the model loads and runs, its numbers are garbage."""
    import shutil

    import numpy as np
    from gguf import GGUFReader

    bad = tmp_path / "nan-slot"
    shutil.copytree(slot, bad)
    reader = GGUFReader(bad / "model.gguf", "r+")
    t = next(t for t in reader.tensors if t.name == tensor)
    assert t.data.dtype == np.float32
    t.data[...] = np.nan
    reader.data.flush()
    del reader
    manifest = json.loads((bad / "manifest.json").read_text())
    for gp in manifest["golden_prompts"]:
        gp.pop("expect", None)  # whatever the text is, the numbers must be finite
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


def test_a_model_producing_nan_logprobs_fails_its_health_check(slot, tmp_path):
    from agent.health import HealthBudget, run_health_check

    bad = _poison(slot, tmp_path)
    report = run_health_check(bad, HealthBudget())
    assert not report["ok"], report
    assert "non-finite log-probability" in report["reason"]


def test_a_model_over_the_memory_budget_is_refused_cleanly_by_the_address_space_limit(slot):
    from agent.health import HealthBudget, run_health_check

    report = run_health_check(slot, HealthBudget(max_memory_bytes=1 << 20, headroom_bytes=0))
    assert not report["ok"], report
    assert "memory budget" in report["reason"]
    # the same model within a budget from a real profile loads under its limit and passes
    from edgellm.profiles import get_profile

    budget = HealthBudget(max_memory_bytes=get_profile(AGENT_PROFILE).usable_ram_bytes)
    report = run_health_check(slot, budget)
    assert report["ok"], report
    assert report["address_space_limit_bytes"] > budget.max_memory_bytes

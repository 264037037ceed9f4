"""`edgellm build`: candidates, per-profile choice, bundles, report, signing, offline install, cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixtures_gguf import training_corpus

GIB = 1024**3
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def eval_text() -> str:
    return "\n".join(training_corpus(80)[40:80])


@pytest.fixture(scope="module")
def build_env(tmp_path_factory, hf_llama_dir, eval_text):
    """Measured candidates (cached) and a fleet of three test profiles sized around them + the MCU."""
    from edgellm._toml import dumps_toml
    from edgellm.pipeline.candidates import ALL_FORMATS, build_candidates

    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib

    root = tmp_path_factory.mktemp("build")
    cache = root / "cache"
    cands = build_candidates(hf_llama_dir, list(ALL_FORMATS), cache_dir=cache, eval_text=eval_text)
    ctx = 256

    def required(fmt: str) -> float:
        return cands.measurements[fmt].memory.at(ctx)["peak_bytes"] * 1.10

    def best_below(limit: float) -> str:
        fits = [f for f in cands.measurements if required(f) < limit]
        # least KL wins; differences below 1e-6 nats are ties, broken by less memory
        return min(fits, key=lambda f: (round(cands.measurements[f].kl_divergence, 6), required(f)))

    # big holds everything; medium sits just below big's choice; small just below medium's
    big = max(required(f) for f in cands.measurements) * 1.2
    medium = required(best_below(big)) * 0.999
    small = required(best_below(medium)) * 0.999
    usable = {"test-big": big, "test-medium": medium, "test-small": small}
    pdir = root / "profiles"
    pdir.mkdir()
    base = tomllib.loads((REPO_ROOT / "hardware_profiles" / "rpi5-8gb.toml").read_text())
    for name, u in usable.items():
        d = json.loads(json.dumps(base))
        d["name"] = name
        d["memory"]["model_share"] = 0.5
        d["memory"]["ram_gb"] = u / 0.5 / GIB
        d["targets"]["context_length"] = ctx
        (pdir / f"{name}.toml").write_text(dumps_toml(d))
    shutil.copy(REPO_ROOT / "hardware_profiles" / "esp32-s3-8mb.toml", pdir)
    (root / "eval.txt").write_text(eval_text)
    return {"root": root, "cache": cache, "profiles": pdir, "cands": cands, "eval": root / "eval.txt"}


@pytest.mark.slow  # shares the ~20 s candidate build (two ONNX exports)
def test_candidates_quality_and_sizes(build_env):
    ms = build_env["cands"].measurements
    assert ms["gguf-q8_0"].top1_agreement >= 0.98
    assert ms["gguf-q4_k_m"].top1_agreement >= 0.90
    assert ms["gguf-f16"].size_bytes > ms["gguf-q8_0"].size_bytes > ms["gguf-q4_k_m"].size_bytes
    assert ms["gguf-q8_0"].kl_divergence < ms["gguf-q4_k_m"].kl_divergence
    for m in ms.values():
        assert 0 < m.efficiency and m.decode_tokens_per_second > 0 and m.bandwidth_here_gbps > 0
        assert m.export["fallbacks"] == []


def _run(args):
    from edgellm.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_refused_profiles_are_a_reported_outcome_unless_strict(hf_llama_dir, tmp_path):
    """A refusal is the build's answer (exit 0, `set -e` scripts go on); --strict makes it fail."""
    args = [
        "build",
        "--model",
        str(hf_llama_dir),
        "--profile",
        "esp32-s3-8mb",
        "--candidates",
        "gguf-q8_0",
        "--profiles-dir",
        str(REPO_ROOT / "hardware_profiles"),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]

    res = _run([*args, "--out", str(tmp_path / "dist")])
    strict = _run([*args, "--out", str(tmp_path / "dist-strict"), "--strict"])

    assert res.exit_code == 0, res.output
    assert "esp32-s3-8mb" in res.output and "REFUSED" in res.output
    assert json.loads((tmp_path / "dist" / "report.json").read_text())["profiles"][0]["chosen"] is None
    assert strict.exit_code == 2 and "REFUSED" in strict.output
    # not a terminal: plain progress lines, one per step, not silence
    steps = [line for line in res.output.splitlines() if line.startswith("[build] ")]
    assert len(steps) >= 2 and any("gguf-q8_0" in line for line in steps), res.output


@pytest.mark.slow  # shares the ~20 s candidate build (two ONNX exports)
def test_build_fleet_signed_offline_installable(build_env, hf_llama_dir, tmp_path):
    from edgellm.bundle import unpack
    from edgellm.runtime import GenerationParams
    from edgellm.runtime.llamacpp import LlamaCppRuntime
    from edgellm.trust import Repository, init_keys, verify_signed_bundle

    keys = tmp_path / "keys"
    init_keys(keys)
    Repository.create(tmp_path / "repo", keys)
    dist = tmp_path / "dist"
    res = _run(
        [
            "build",
            "--model",
            str(hf_llama_dir),
            "--out",
            str(dist),
            "--profile",
            "test-big",
            "--profile",
            "test-medium",
            "--profile",
            "test-small",
            "--profile",
            "esp32-s3-8mb",
            "--profiles-dir",
            str(build_env["profiles"]),
            "--cache-dir",
            str(build_env["cache"]),
            "--eval-text",
            str(build_env["eval"]),
            "--repo",
            str(tmp_path / "repo"),
            "--keys",
            str(keys),
            "--name",
            "tiny",
            "--version",
            "1.2.0",
            "--strict",
        ]
    )
    assert res.exit_code == 2, res.output  # the MCU is refused, and --strict wants every profile
    assert "esp32-s3-8mb" in res.output and "REFUSED" in res.output and "no LLM runtime" in res.output

    report = json.loads((dist / "report.json").read_text())
    chosen = {p["profile"]: p["chosen"] for p in report["profiles"]}
    ms = build_env["cands"].measurements
    assert len({chosen["test-big"], chosen["test-medium"], chosen["test-small"]}) == 3, chosen
    assert ms[chosen["test-big"]].kl_divergence < 1e-6
    assert ms[chosen["test-small"]].size_bytes < ms[chosen["test-big"]].size_bytes
    assert chosen["esp32-s3-8mb"] is None
    assert all(c["cached"] for c in report["candidates"])  # measured by the fixture already
    assert {c["fmt"] for c in report["candidates"]} >= {"onnx-fp32", "onnx-int8", "gguf-q4_k_m"}
    md = (dist / "report.md").read_text()
    for fmt in ("gguf-f16", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k_m", "gguf-q4_k_m", "gguf-q4_0"):
        assert f"| {fmt} |" in md
    assert f"**Chosen: {chosen['test-medium']}**" in md and "usable RAM is" in md and "**Refused:**" in md

    # each bundle in DIST is signed and installs offline; GGUF ones serve and pass their golden prompts
    assert sorted(p.name for p in dist.glob("*.signed")) == sorted(
        f"tiny-1.2.0-test-{t}.bundle.signed" for t in ("big", "medium", "small")
    )
    served = 0
    for tier in ("big", "medium", "small"):
        signed = dist / f"tiny-1.2.0-test-{tier}.bundle.signed"
        vt = verify_signed_bundle(signed, keys / "root.json", tmp_path / "tuf-cache", tmp_path / f"inbox-{tier}")
        manifest = unpack(vt.path, tmp_path / f"slot-{tier}")
        assert manifest.profiles == [f"test-{tier}"]
        assert f"{manifest.runtime}-{manifest.quantization}" == chosen[f"test-{tier}"]
        assert manifest.memory.context_length == 256 and manifest.memory.peak_bytes > manifest.memory.weights_bytes
        assert manifest.generation["threads"] == 4 and manifest.golden_prompts
        assert manifest.metrics["top1_agreement"] >= 0.9
        # the device agent's own health check (child process: golden prompts, speed and memory
        # budgets from the manifest) passes on what the build produced
        from agent.health import budget_for, run_health_check

        health = run_health_check(tmp_path / f"slot-{tier}", budget_for(manifest, None))
        assert health["ok"], health
        if manifest.runtime != "gguf":
            assert manifest.tokenizer == "tokenizer.json"
            continue
        art = manifest.file(manifest.artifact)
        with LlamaCppRuntime.load(
            tmp_path / f"slot-{tier}" / manifest.artifact,
            threads=1,
            context_length=manifest.memory.context_length,
            sha256=art.sha256,
            size=art.size,
        ) as rt:
            for g in manifest.golden_prompts:
                out = rt.complete(g.prompt, GenerationParams(max_tokens=g.max_tokens)).text
                if g.expect:
                    assert g.expect in out
        served += 1
    assert served >= 1


@pytest.mark.slow  # shares the ~20 s candidate build (two ONNX exports)
def test_budgets_pin_and_refusal_messages(build_env, hf_llama_dir, tmp_path):
    from edgellm.pipeline.fleet_build import BuildConfig, run_build
    from edgellm.pipeline.select import Budget

    def build(**budget):
        return run_build(
            BuildConfig(
                model_dir=hf_llama_dir,
                profiles=["test-big"],
                out_dir=tmp_path / str(len(budget)),
                budget=Budget(**budget),
                cache_dir=build_env["cache"],
                profiles_dir=build_env["profiles"],
                eval_text=build_env["eval"].read_text(),
            )
        )

    a, b = build(pin_format="gguf-q4_0"), build(pin_format="gguf-q4_0", headroom=0.1)
    assert a.results[0].selection.chosen == "gguf-q4_0"
    # unchanged inputs: every candidate comes from the cache and the bundle is byte-identical
    assert all(m.cached for m in b.candidates.measurements.values())
    assert a.results[0].bundle_sha256 == b.results[0].bundle_sha256
    r = build(min_tokens_per_second=1e12).results[0]
    assert r.selection.chosen is None and "below" in r.selection.refusal
    assert r.bundle is None


@pytest.mark.slow  # shares the ~20 s candidate build (two ONNX exports)
def test_bad_inputs_get_hints(build_env, tmp_path, hf_llama_dir):
    res = _run(
        [
            "build",
            "--model",
            str(tmp_path),
            "--profile",
            "test-big",
            "--out",
            str(tmp_path / "o"),
            "--profiles-dir",
            str(build_env["profiles"]),
        ]
    )
    assert res.exit_code != 0 and "config.json" in res.output and "hint" in res.output
    res = _run(
        [
            "build",
            "--model",
            str(hf_llama_dir),
            "--profile",
            "nope",
            "--out",
            str(tmp_path / "o"),
            "--profiles-dir",
            str(build_env["profiles"]),
        ]
    )
    assert res.exit_code != 0 and "unknown hardware profile" in res.output
    bad = tmp_path / "prefix-space"
    shutil.copytree(hf_llama_dir, bad)
    tj = json.loads((bad / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["add_prefix_space"] = True
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    res = _run(
        [
            "build",
            "--model",
            str(bad),
            "--profile",
            "test-big",
            "--out",
            str(tmp_path / "o"),
            "--profiles-dir",
            str(build_env["profiles"]),
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    assert res.exit_code == 1 and "prefix space" in res.output and "hint" in res.output


def test_fraction_option_parsing():
    import click

    from edgellm.cli.build import _fraction

    assert _fraction("5%") == pytest.approx(0.05) and _fraction("0.02") == 0.02 and _fraction(None) is None
    with pytest.raises(click.BadParameter):
        _fraction("lots")

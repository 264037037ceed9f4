"""LoRA adapters end to end: finetune -> adapter GGUF -> signed adapter bundle -> the agent applies it
on the base it already runs, serves several adapters on one base, refuses what does not fit, and
survives kill -9 during an adapter install."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_adapters import build_args, run_cli
from fixtures_agent import AgentProcess, agent_cli, provision_agent, serve_directory

PROMPTS = ["The red lamp in the", "The blue lamp", "def door_3(x):"]
STEPS = 32


def _greedy_texts(gguf: Path, prompts: list[str], adapter: Path | None = None) -> list[str]:
    from edgellm.runtime import GenerationParams
    from edgellm.runtime.llamacpp import LlamaCppRuntime
    from edgellm.runtime.lora import LoraAdapters

    with LlamaCppRuntime.load(gguf, threads=1, context_length=256) as rt:
        if adapter is not None:
            lora = LoraAdapters(rt)
            lora.load("a", adapter)
            lora.activate("a")
        return [rt.complete(p, GenerationParams(max_tokens=STEPS)).text for p in prompts]


def _merged_f32(base_gguf: Path, env: dict, out: Path) -> Path:
    """The merged model the device's base + adapter must equal: the base artifact's own weights
    (F16, read back exactly) with the adapter folded in, written as an F32 GGUF."""
    from edgellm.pipeline.export.gguf import export_gguf
    from edgellm.pipeline.finetune import load_adapter
    from edgellm.pipeline.gguf_load import load_gguf_model
    from edgellm.pipeline.lora import apply_lora, load_lora_state, merge_lora
    from edgellm.pipeline.model import save_model_dir

    ad = load_adapter(env["kitchen"])
    model = load_gguf_model(base_gguf)
    apply_lora(model, ad.config)
    load_lora_state(model, ad.state)
    merge_lora(model)
    tok = {n: (env["base"] / n).read_text() for n in ("tokenizer.json", "tokenizer_config.json")}
    save_model_dir(model, out.with_suffix(".dir"), extra_files=tok)
    export_gguf(out.with_suffix(".dir"), out, "gguf-f32")
    return out


def _unpacked(envelope: Path, env: dict, tmp: Path) -> tuple[object, Path]:
    from edgellm.bundle import unpack
    from edgellm.trust import verify_signed_bundle

    vt = verify_signed_bundle(envelope, env["root"], tmp / "tuf-cache", tmp / "inbox")
    out = tmp / "unpacked"
    return unpack(vt.path, out), out


def test_adapter_gguf_with_base_equals_the_merged_model_greedy(adapter_env, tmp_path) -> None:
    """base + adapter in llama.cpp == the adapter folded into the weights (F32, F32 KV cache), 32 tokens."""
    from edgellm.pipeline.export.gguf import export_gguf
    from edgellm.pipeline.export.gguf_lora import write_lora_gguf
    from edgellm.pipeline.finetune import load_adapter, merge_adapter
    from edgellm.runtime import GenerationParams
    from edgellm.runtime.llamacpp import LlamaCppRuntime
    from edgellm.runtime.lora import LoraAdapters

    ad = load_adapter(adapter_env["kitchen"])
    write_lora_gguf(ad.state, ad.rank, ad.alpha, adapter_env["base"], tmp_path / "a.gguf", dtype="F32")
    merged = merge_adapter(adapter_env["base"], adapter_env["kitchen"], tmp_path / "merged")
    export_gguf(adapter_env["base"], tmp_path / "base.gguf", "gguf-f32")
    export_gguf(merged, tmp_path / "merged.gguf", "gguf-f32")
    p = GenerationParams(max_tokens=STEPS)
    with (
        LlamaCppRuntime.load(tmp_path / "base.gguf", kv_cache_type="f32", context_length=256) as base,
        LlamaCppRuntime.load(tmp_path / "merged.gguf", kv_cache_type="f32", context_length=256) as ref,
    ):
        lora = LoraAdapters(base)
        lora.load("kitchen", tmp_path / "a.gguf")
        changed = 0
        for prompt in PROMPTS:
            lora.activate("kitchen")
            with_adapter = base.complete(prompt, p).token_ids
            assert with_adapter == ref.complete(prompt, p).token_ids, prompt
            lora.activate(None)  # back to the base alone, same loaded model
            changed += base.complete(prompt, p).token_ids != with_adapter
        assert changed >= 1  # the adapter does change what the model says


def test_adapter_bundle_names_its_base_and_is_small(adapter_env, tmp_path) -> None:
    from edgellm._fs import sha256_file
    from edgellm.adapters import base_of

    base_manifest, base_dir = _unpacked(adapter_env["base_envelope"], adapter_env, tmp_path / "b")
    manifest, d = _unpacked(adapter_env["kitchen_envelope"], adapter_env, tmp_path / "k")
    ref = base_of(manifest)
    assert (ref.name, ref.version) == ("tiny", "1.0.0")
    assert ref.artifact_sha256 == sha256_file(base_dir / "model.gguf")
    assert [f.path for f in manifest.files] == ["adapter.gguf"] and manifest.golden_prompts
    report = json.loads((adapter_env["dir"] / "dist-kitchen" / "report.json").read_text())
    wire = report["profiles"][0]["wire"]
    assert report["profiles"][0]["kind"] == "adapter"
    assert wire["bundle_bytes"] == adapter_env["kitchen_envelope"].stat().st_size
    assert wire["bundle_bytes"] < wire["full_bundle_bytes"] and wire["ratio"] < 0.5
    from edgellm.trust import Repository

    lengths = {t.name: t.length for t in Repository(adapter_env["repo"]).list_targets()}
    assert wire["target_bytes"] == lengths["kitchen-0.1.0-test-gguf.bundle"]  # what a rollout plans
    assert "On the wire:" in (adapter_env["dir"] / "dist-kitchen" / "report.md").read_text()


@pytest.mark.slow  # two ONNX exports (~20 s)
def test_onnx_profiles_get_a_merged_full_bundle(adapter_env, tmp_path) -> None:
    out = tmp_path / "dist"
    run_cli(
        build_args(
            adapter_env,
            "--profile",
            "test-gguf",
            "--profile",
            "test-onnx",
            "--adapter",
            str(adapter_env["kitchen"]),
            "--name",
            "kitchen",
            "--base-name",
            "tiny",
            "--candidates",
            "gguf-f16,onnx-fp32",
            "--out",
            str(out),
        )
    )
    report = json.loads((out / "report.json").read_text())
    kinds = {p["profile"]: p["kind"] for p in report["profiles"]}
    assert kinds == {"test-gguf": "adapter", "test-onnx": "merged"}
    from edgellm.bundle import read_manifest

    merged = read_manifest(out / "kitchen-0.1.0-test-onnx.bundle")
    assert merged.runtime == "onnx" and "kind" not in merged.extra


def test_adapter_without_its_base_is_refused_with_the_reason(adapter_env, tmp_path) -> None:
    d = provision_agent(tmp_path / "agent", adapter_env["root"])
    r = agent_cli("install", str(adapter_env["kitchen_envelope"]), data_dir=d, check=False)
    assert r.returncode != 0 and "applies to base tiny 1.0.0" in r.stderr + r.stdout
    assert "install base tiny 1.0.0 first" in r.stderr + r.stdout
    assert not any((d / "adapters").glob("kitchen@*"))


def test_adapter_and_base_given_together_install_base_first(adapter_env, tmp_path) -> None:
    from edgellm.trust import Repository

    repo = Repository(adapter_env["repo"], adapter_env["keys"])  # both with today's metadata (TUF never goes back)
    files = [
        repo.export_signed(adapter_env[k].name.removesuffix(".signed"), tmp_path / adapter_env[k].name)
        for k in ("kitchen_envelope", "base_envelope")
    ]
    d = provision_agent(tmp_path / "agent", adapter_env["root"])
    out = json.loads(agent_cli("install", *map(str, files), "--format", "json", data_dir=d).stdout)
    assert [(r["ok"], r["version"]) for r in out] == [(True, "1.0.0"), (True, "0.1.0")]
    st = json.loads(agent_cli("status", "--format", "json", data_dir=d).stdout)
    assert st["version"] == "1.0.0" and [a["name"] for a in st["adapters"]["installed"]] == ["kitchen"]


def test_foreign_base_or_tampered_adapter_refused_device_keeps_serving(adapter_env, tmp_path) -> None:
    d = provision_agent(tmp_path / "agent", adapter_env["root"])
    agent_cli("install", str(adapter_env["base_envelope"]), data_dir=d)
    agent_cli("install", str(adapter_env["kitchen_envelope"]), data_dir=d)
    r = agent_cli("install", str(adapter_env["foreign_base_envelope"]), data_dir=d, check=False)
    assert r.returncode != 0 and "applies to base tiny 1.0.0" in r.stderr + r.stdout
    data = bytearray(adapter_env["garage_envelope"].read_bytes())
    i = data.find(b"GGUF")
    data[i + 2048] ^= 0xFF
    (tmp_path / "tampered.signed").write_bytes(bytes(data))
    r = agent_cli("install", str(tmp_path / "tampered.signed"), data_dir=d, check=False)
    assert r.returncode != 0 and "failed verification" in r.stderr + r.stdout
    st = json.loads(agent_cli("status", "--format", "json", data_dir=d).stdout)
    assert st["model"] == "tiny" and st["version"] == "1.0.0"
    assert [(a["name"], a["version"], a["serving"]) for a in st["adapters"]["installed"]] == [
        ("kitchen", "0.1.0", True)
    ]
    assert sorted(p.name for p in (d / "adapters").iterdir() if p.is_dir()) == ["kitchen@0.1.0"]


@pytest.mark.slow  # a real agent process with three models' worth of requests
def test_agent_serves_base_and_adapters_by_model_field_equal_to_merged(adapter_env, tmp_path) -> None:
    import httpx

    base_manifest, base_dir = _unpacked(adapter_env["base_envelope"], adapter_env, tmp_path / "b")
    _merged_f32(base_dir / "model.gguf", adapter_env, tmp_path / "merged.gguf")
    want = _greedy_texts(tmp_path / "merged.gguf", PROMPTS)

    d = provision_agent(tmp_path / "agent", adapter_env["root"])
    for env_key in ("base_envelope", "kitchen_envelope", "garage_envelope"):
        agent_cli("install", str(adapter_env[env_key]), data_dir=d)
    with AgentProcess(d) as agent:

        def complete(model: str, prompt: str) -> httpx.Response:
            return httpx.post(
                agent.base_url + "/v1/completions",
                headers=agent.headers,
                timeout=60,
                json={"model": model, "prompt": prompt, "max_tokens": STEPS, "temperature": 0},
            )

        models = httpx.get(agent.base_url + "/v1/models", headers=agent.headers).json()["data"]
        assert [m["id"] for m in models] == ["tiny", "tiny:garage", "tiny:kitchen"]
        created = {m["created"] for m in models}
        got, base_texts = [], []
        for prompt in PROMPTS:  # interleaved: base, kitchen, garage, on one loaded model
            base_texts.append(complete("tiny", prompt).json()["choices"][0]["text"])
            r = complete("tiny:kitchen", prompt)
            assert r.status_code == 200 and r.json()["model"] == "tiny:kitchen"
            got.append(r.json()["choices"][0]["text"])
            assert complete("tiny:garage", prompt).status_code == 200
        assert got == want
        assert got != base_texts
        again = httpx.get(agent.base_url + "/v1/models", headers=agent.headers).json()["data"]
        assert {m["created"] for m in again} == created  # no model reload for any switch
        assert agent.logs().count("serving model") <= 1

        assert complete("tiny:attic", PROMPTS[0]).status_code == 404
        agent_cli("rollback", "--adapter", "kitchen", data_dir=d)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            ids = [m["id"] for m in httpx.get(agent.base_url + "/v1/models", headers=agent.headers).json()["data"]]
            if "tiny:kitchen" not in ids:
                break
            time.sleep(0.2)
        assert ids == ["tiny", "tiny:garage"]
        assert complete("tiny:kitchen", PROMPTS[0]).status_code == 404
        assert complete("tiny", PROMPTS[0]).json()["choices"][0]["text"] == base_texts[0]


CRASH_POINTS = ["adapter_unpacked", "adapter_renamed", "adapter_health_checked", "adapter_switched"]


@pytest.mark.slow
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_9_during_adapter_install_leaves_a_complete_verified_state(adapter_env, tmp_path, point) -> None:
    from agent.adapters import AdapterStore
    from agent.config import AgentPaths
    from agent.manifest import verify_slot
    from agent.slots import SlotStore

    d = provision_agent(tmp_path / "agent", adapter_env["root"])
    agent_cli("install", str(adapter_env["base_envelope"]), data_dir=d)
    agent_cli("install", str(adapter_env["kitchen_envelope"]), data_dir=d)
    r = agent_cli(
        "install", str(adapter_env["garage_envelope"]), data_dir=d, check=False, env={"EDGELLM_AGENT_CRASH_AT": point}
    )
    assert r.returncode == -signal.SIGKILL
    paths = AgentPaths(d)
    store = AdapterStore(paths)
    store.boot()  # what a restarting daemon does
    state = store.load()
    assert "kitchen" in state.adapters
    assert ("garage" in state.adapters) == (point == "adapter_switched")
    on_disk = sorted(p.name for p in store.root.iterdir() if p.is_dir())
    assert on_disk == sorted(rec.dirname for rec in state.adapters.values())
    for rec in state.adapters.values():
        verify_slot(store.dir_of(rec), rec.manifest_sha256)
    slots = SlotStore(paths).load()
    assert slots.current_record is not None and slots.current_record.version == "1.0.0"
    agent_cli("install", str(adapter_env["garage_envelope"]), data_dir=d, check=point != "adapter_switched")
    assert "garage" in store.load().adapters


def test_agent_never_imports_torch_for_adapters() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; import agent.adapters, agent.lora_serving, agent.install, "
        "agent.daemon, edgellm.runtime.lora, edgellm.adapters"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_federated_result_published_as_adapter_installs_on_the_base(adapter_env, tmp_path) -> None:
    """server/federated: the averaged adapters become an adapter bundle per GGUF base bundle."""
    from safetensors.numpy import save_file

    from edgellm.pipeline.finetune import load_adapter
    from edgellm.trust import Repository
    from server.federated.adapter_publish import publish_adapters
    from server.federated.publish import base_targets

    ad = load_adapter(adapter_env["kitchen"])
    save_file({k: v.numpy() for k, v in ad.state.items()}, str(tmp_path / "avg.safetensors"))
    repo = Repository(adapter_env["repo"], adapter_env["keys"])
    bases = base_targets(adapter_env["repo"], "tiny", "1.0.0")
    names = publish_adapters(
        repo,
        bases,
        tmp_path / "avg.safetensors",
        ad.rank,
        ad.alpha,
        adapter_env["base"],
        model="tiny",
        base_version="1.0.0",
        version="1.1.0",
        lineage={"federated": {"run": "fl-test"}},
        work=tmp_path / "work",
    )
    assert len(names) == 1
    facts = {t.name: t.custom["edgellm"] for t in repo.list_targets()}[names[0]]
    assert facts["kind"] == "adapter" and facts["base"]["artifact_sha256"] == bases[0].artifact_sha256
    assert facts["federated"]["run"] == "fl-test"
    envelope = repo.export_signed(names[0], tmp_path / "federated.signed")
    d = provision_agent(tmp_path / "agent", adapter_env["root"])
    agent_cli("install", str(adapter_env["base_envelope"]), data_dir=d)
    agent_cli("install", str(envelope), data_dir=d)
    st = json.loads(agent_cli("status", "--format", "json", data_dir=d).stdout)
    assert [(a["name"], a["version"], a["serving"]) for a in st["adapters"]["installed"]] == [
        ("federated", "1.1.0", True)
    ]


@pytest.fixture
def adapter_repo_server(adapter_env):
    """adapter_env's signed repository over HTTP ({url}/metadata/, {url}/targets/)."""
    with serve_directory(adapter_env["repo"]) as url:
        yield url


def test_online_update_to_an_adapter_installs_it_beside_the_base(adapter_env, adapter_repo_server, tmp_path) -> None:
    d = provision_agent(
        tmp_path / "agent", adapter_env["root"], server=adapter_repo_server, profile="test-gguf"
    )  # the profile the bundles were built for
    agent_cli("install", str(adapter_env["base_envelope"]), data_dir=d)
    # an adapter's version (0.1.0) is not compared with the base's (1.0.0): it is no downgrade
    out = json.loads(agent_cli("update", "--model", "kitchen", "--format", "json", data_dir=d).stdout)
    assert out["ok"] and out["adapter"] == "kitchen" and out["version"] == "0.1.0", out  # 0.2.0: another base
    again = json.loads(agent_cli("update", "--model", "kitchen", "--format", "json", data_dir=d).stdout)
    assert again["reason"] == "up to date"
    st = json.loads(agent_cli("status", "--format", "json", data_dir=d).stdout)
    assert st["version"] == "1.0.0" and [a["name"] for a in st["adapters"]["installed"]] == ["kitchen"]


def test_adapter_failing_its_golden_prompts_is_rejected_base_keeps_serving(adapter_env, tmp_path) -> None:
    from edgellm.bundle import pack
    from edgellm.trust import Repository

    manifest, d = _unpacked(adapter_env["garage_envelope"], adapter_env, tmp_path / "g")
    m = json.loads((d / "manifest.json").read_text())
    m["version"] = "0.3.0"
    m["golden_prompts"] = [{"prompt": "def door_3(x):", "max_tokens": 4, "expect": "never-said-xyz"}]
    (d / "manifest.json").write_text(json.dumps(m))
    repo = Repository(adapter_env["repo"], adapter_env["keys"])
    envelope = repo.export_signed(
        repo.add_bundle(pack(d, tmp_path / "garage-0.3.0.bundle").path), tmp_path / "garage-0.3.0.signed"
    )
    base = repo.export_signed(adapter_env["base_envelope"].name.removesuffix(".signed"), tmp_path / "base.signed")
    dd = provision_agent(tmp_path / "agent", adapter_env["root"])
    agent_cli("install", str(base), data_dir=dd)
    r = agent_cli("install", str(envelope), data_dir=dd, check=False)
    assert (
        r.returncode != 0 and "health check failed" in r.stderr + r.stdout and "never-said-xyz" in r.stderr + r.stdout
    )
    st = json.loads(agent_cli("status", "--format", "json", data_dir=dd).stdout)
    assert st["version"] == "1.0.0" and st["adapters"]["installed"] == []
    assert st["adapters"]["rejected"] == ["garage@0.3.0"]
    assert not any((dd / "adapters").glob("garage@*"))


def test_adapter_gguf_checked_against_the_base_before_llama_cpp_reads_it(adapter_env, tiny_gguf, tmp_path) -> None:
    import gguf
    import numpy as np

    from edgellm.errors import ModelLoadError
    from edgellm.pipeline.export.gguf_lora import write_lora_gguf
    from edgellm.pipeline.finetune import load_adapter
    from edgellm.runtime.gguf_check import check_gguf
    from edgellm.runtime.lora import check_lora_gguf

    ad = load_adapter(adapter_env["kitchen"])
    good = tmp_path / "good.gguf"
    write_lora_gguf(ad.state, ad.rank, ad.alpha, adapter_env["base"], good)
    base = check_gguf(tiny_gguf)
    assert check_lora_gguf(good, base)["rank"] == ad.rank

    def hostile(name: str, tensors: dict[str, np.ndarray], general_type: str = "adapter") -> Path:
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        w.add_type(general_type)
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 8.0)
        for k, v in tensors.items():
            w.add_tensor(k, v)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    a, b = np.zeros((4, 256), np.float32), np.zeros((256, 4), np.float32)
    cases = {
        "a model, not an adapter": hostile(
            "model.gguf", {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b}, "model"
        ),
        "a layer the base lacks": hostile(
            "layer.gguf", {"blk.99.attn_q.weight.lora_a": a, "blk.99.attn_q.weight.lora_b": b}
        ),
        "a shape that does not fit": hostile(
            "shape.gguf",
            {"blk.0.attn_q.weight.lora_a": np.zeros((4, 100), np.float32), "blk.0.attn_q.weight.lora_b": b},
        ),
        "half a pair": hostile("half.gguf", {"blk.0.attn_q.weight.lora_a": a}),
    }
    for path in cases.values():  # keyed by what is wrong with each
        with pytest.raises(ModelLoadError):
            check_lora_gguf(path, base)

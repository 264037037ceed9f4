"""Runtime settings travel from the profile through the manifest to what llama.cpp is given.

The thread count and flash-attention flag are read back from llama.cpp's own context
parameters, not from our records of what we meant to pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fixtures_agent import agent_cli

from edgellm.errors import EdgeLLMError
from edgellm.runtime.settings import RuntimeSettings, RuntimeSettingsError, for_profile, resolve

PROFILE = "rpi5-8gb"  # 4 cores, 4 threads


def _slot(data_dir: Path, gguf: Path, settings: dict | None) -> Path:
    """An unpacked slot as the installer leaves it: the artifact and its manifest."""
    from agent.config import AgentPaths
    from edgellm._fs import sha256_file

    paths = AgentPaths(data_dir)
    slot = paths.slot_dir("a")
    slot.mkdir(parents=True)
    shutil.copyfile(gguf, slot / "model.gguf")
    files = [{"path": "model.gguf", "sha256": sha256_file(gguf), "size": gguf.stat().st_size}]
    manifest = {
        "name": "tiny",
        "version": "1.0.0",
        "runtime": "gguf",
        "artifact": "model.gguf",
        "quantization": "q8_0",
        "profiles": [PROFILE],
        "memory": {"context_length": 256},
        "generation": {"temperature": 0.0, "threads": 1},
        "files": files,
    }
    if settings is not None:
        manifest["runtime_settings"] = settings
    (slot / "manifest.json").write_text(json.dumps(manifest))
    return data_dir


def _given(handle) -> tuple[int, int, bool]:
    """What llama.cpp's context was created with."""
    import llama_cpp

    cp = handle.runtime._llm.context_params
    return int(cp.n_threads), int(cp.n_threads_batch), cp.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED


def test_profile_settings_reach_llama_cpp(tmp_path, tiny_gguf, monkeypatch) -> None:
    from agent.config import AgentPaths
    from agent.daemon import load_handle
    from edgellm.profiles import get_profile

    monkeypatch.setattr("edgellm.runtime.settings.usable_cpus", lambda: 8)  # a device with 8 free CPUs
    profile = get_profile(PROFILE)
    settings = for_profile(profile, "gguf")
    assert settings.threads == profile.threads == 4 and settings.flash_attn
    data = _slot(tmp_path / "agent", tiny_gguf, settings.to_dict())
    handle = load_handle(AgentPaths(data), "a", threads=None)
    try:
        assert _given(handle) == (4, 4, True)
        assert handle.runtime.settings["kv_cache_type"] == "f16"
        assert handle.runtime.complete(handle.runtime.tokenize("Hello"), _params()).token_ids  # it runs
    finally:
        handle.runtime.close()


def test_manifest_threads_are_capped_at_the_usable_cpus(tmp_path, tiny_gguf, monkeypatch) -> None:
    from agent.config import AgentPaths
    from agent.daemon import load_handle

    monkeypatch.setattr("edgellm.runtime.settings.usable_cpus", lambda: 2)
    data = _slot(tmp_path / "agent", tiny_gguf, RuntimeSettings(threads=8).to_dict())
    handle = load_handle(AgentPaths(data), "a")
    try:
        assert _given(handle)[:2] == (2, 2)
    finally:
        handle.runtime.close()


def test_provision_threads_overrides_the_manifest(tmp_path, tiny_gguf, agent_bundles) -> None:
    from agent.config import AgentConfig, AgentPaths
    from agent.daemon import load_handle

    data = tmp_path / "agent"
    agent_cli(
        "provision",
        "--device-id",
        "dev-1",
        "--profile",
        PROFILE,
        "--root",
        str(agent_bundles["root"]),
        "--threads",
        "3",
        data_dir=data,
    )
    cfg = AgentConfig.load(AgentPaths(data))
    assert cfg.threads == 3
    _slot(data, tiny_gguf, RuntimeSettings(threads=1, flash_attn=False).to_dict())
    handle = load_handle(AgentPaths(data), "a", threads=cfg.threads)
    try:
        assert _given(handle) == (3, 3, False)  # threads from the config, flash attention from the manifest
    finally:
        handle.runtime.close()


def test_provision_without_threads_leaves_it_to_the_bundle(tmp_path, agent_bundles) -> None:
    from agent.config import AgentConfig, AgentPaths

    data = tmp_path / "agent"
    agent_cli(
        "provision", "--device-id", "dev-1", "--profile", PROFILE, "--root", str(agent_bundles["root"]), data_dir=data
    )
    assert AgentConfig.load(AgentPaths(data)).threads is None
    r = agent_cli(
        "provision",
        "--device-id",
        "dev-1",
        "--profile",
        PROFILE,
        "--root",
        str(agent_bundles["root"]),
        "--threads",
        "0",
        "--force",
        data_dir=data,
        check=False,
    )
    assert r.returncode != 0 and "threads" in r.stderr.lower()


def test_old_manifest_threads_still_apply(tmp_path, tiny_gguf) -> None:
    from edgellm.bundle import Manifest

    m = Manifest.from_dict(
        {"name": "t", "version": "1", "runtime": "gguf", "artifact": "model.gguf", "generation": {"threads": 2}}
    )
    assert resolve(m, cpus=4).threads == 2 and resolve(m, 1, cpus=4).threads == 1
    four = Manifest.from_dict(
        {"name": "t", "version": "1", "runtime": "gguf", "artifact": "model.gguf", "runtime_settings": {"threads": 4}}
    )
    assert [resolve(four, cpus=c).threads for c in (1, 2, 3, 4, 8)] == [1, 2, 3, 3, 4]  # one CPU spared from 4
    assert resolve(four, 4, cpus=4).threads == 4  # an explicit --threads is used as given


@pytest.mark.parametrize(
    "bad",
    [
        {"threads": "4"},
        {"threads": 0},
        {"threads": 10**6},
        {"threads": True},
        {"flash_attn": "yes"},
        {"kv_cache_type": "q4_0"},
        {"kv_cache_type": "q8_0", "flash_attn": False},
        {"batch_size": 64, "ubatch_size": 128},
        {"mmap": 1},
        [],
        "x",
    ],
)
def test_bad_runtime_settings_are_refused(bad) -> None:
    with pytest.raises(RuntimeSettingsError) as e:
        RuntimeSettings.from_dict(bad)
    assert isinstance(e.value, EdgeLLMError) and e.value.hint


def test_bad_config_threads_are_refused() -> None:
    from agent.config import AgentConfig
    from agent.errors import ConfigError

    for bad in (0, "2", 1000, 1.5):
        with pytest.raises(ConfigError):
            AgentConfig.from_dict({"device_id": "d", "profile": PROFILE, "threads": bad})


def _params():
    from edgellm.runtime import GenerationParams

    return GenerationParams(max_tokens=4)


@pytest.mark.slow
def test_onnx_is_exported_once_per_build_and_predictions_are_capped(tmp_path, hf_llama_dir, monkeypatch) -> None:
    """int8 quantizes the fp32 candidate's export; every prediction's inputs are in the measurement."""
    import edgellm.pipeline.export.onnx as onnx_export
    from edgellm.pipeline.candidates import build_candidates

    calls = []
    real = onnx_export._export_fp32
    monkeypatch.setattr(onnx_export, "_export_fp32", lambda *a, **k: calls.append(1) or real(*a, **k))
    cands = build_candidates(
        hf_llama_dir,
        ["gguf-q8_0", "onnx-fp32", "onnx-int8"],
        cache_dir=tmp_path / "cache",
        eval_text="The robot checks the battery. " * 40,
        max_eval_tokens=64,
        window=32,
    )
    assert set(cands.measurements) == {"gguf-q8_0", "onnx-fp32", "onnx-int8"}, cands.failures
    assert len(calls) == 1
    assert cands.bandwidth["median_gbps"] > 0 and len(cands.bandwidth["samples_gbps"]) == 6
    for m in cands.measurements.values():
        inputs = m.extra["prediction_inputs"]
        assert len(inputs["bandwidth_samples_gbps"]) == 2 and 0 < m.efficiency <= 1.0
        assert (
            m.efficiency == min(1.0, inputs["efficiency_measured"])
            or abs(m.efficiency - inputs["efficiency_measured"]) < 1e-3
        )
        assert m.predicted_tokens_per_second(1e6) <= 1e15 / m.bytes_per_token  # never above the roofline


def _publish_body(topic: bytes, mid: int, props: bytes, payload: bytes) -> bytes:
    return len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big") + bytes([len(props)]) + props + payload


def test_fast_publish_parser_matches_the_wire_and_refuses_oddities() -> None:
    from server._mqtt_fast import parse_publish_v5

    topic = b"edgellm/v1/dev/robot-1/event"
    assert parse_publish_v5(_publish_body(topic, 7, b"", b'{"a":1}')) == (7, topic.decode(), b'{"a":1}')
    props = b"\x01\x01\x03\x00\x10application/json"  # payload format + content type: skipped
    assert parse_publish_v5(_publish_body(topic, 65535, props, b"x")) == (65535, topic.decode(), b"x")
    good = _publish_body(topic, 7, b"", b"")
    for bad in (
        b"",
        b"\x00",
        good[: len(topic) + 3],
        b"\x00\x00\x00\x07\x00",  # truncated; empty topic (alias)
        _publish_body(b"\xff\xfe", 7, b"", b""),  # not UTF-8
        _publish_body(topic, 0, b"", b""),  # packet id 0
        len(topic).to_bytes(2, "big") + topic + b"\x00\x07\xff\xff\xff\xff\x01",  # 5-byte varint
        len(topic).to_bytes(2, "big") + topic + b"\x00\x07\x05ab",  # properties past the end
        b"\xff\xff" + topic,
    ):
        assert parse_publish_v5(bad) is None, bad


def test_the_roofline_bandwidth_is_a_read_pass_and_says_so():
    """A decode streams its weights: its roofline is read bandwidth. A copy counts reads and writes,
    reads lower here and would let a decode show an efficiency above 1."""
    from edgellm.hardware import BandwidthMeter

    read = BandwidthMeter(buffer_mb=8)
    read.sample(passes=1)
    d = read.result().to_dict()
    assert d["kind"] == "read" and "bytes read" in d["method"] and d["median_gbps"] > 0
    copy = BandwidthMeter(buffer_mb=8, kind="copy")
    assert copy._bytes_per_pass == 2 * read._bytes_per_pass
    with pytest.raises(ValueError, match="read, copy"):
        BandwidthMeter(buffer_mb=8, kind="write")

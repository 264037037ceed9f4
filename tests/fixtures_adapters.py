"""Adapter fixtures: two LoRA adapters fine-tuned on the tiny HF Llama, and their signed bundles.

adapter_env   module: {"base", "kitchen", "garage" (adapter dirs), "keys", "root", "profiles",
              "cache", "base_envelope" (tiny 1.0.0, GGUF F16), "kitchen_envelope",
              "garage_envelope" (adapters on that base), "foreign_base_envelope" (kitchen 0.2.0
              built on the Q8_0 base, which the device does not run), "eval" (text file)}
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
_COLORS = ["red", "green", "blue", "amber", "white"]
_PLACES = ["kitchen", "garage", "garden", "hall"]


def lamp_lines(n: int) -> list[str]:
    return [f"The {_COLORS[i % 5]} lamp in the {_PLACES[i % 4]} blinks {i % 3 + 1} times." for i in range(n)]


def door_lines(n: int) -> list[str]:
    return [f"def door_{i % 7}(x):\n    return x * {i % 5 + 2}" for i in range(n)]


def write_profiles(out: Path) -> Path:
    """test-gguf (llama.cpp only) and test-onnx (onnxruntime only), sized like a Raspberry Pi 5."""
    import tomllib

    from edgellm._toml import dumps_toml

    out.mkdir(parents=True, exist_ok=True)
    base = tomllib.loads((REPO_ROOT / "hardware_profiles" / "rpi5-8gb.toml").read_text())
    for name, runtimes in (("test-gguf", ["llama.cpp"]), ("test-onnx", ["onnxruntime"])):
        d = json.loads(json.dumps(base))
        d["name"] = name
        d["runtimes"]["available"] = runtimes
        d["targets"]["context_length"] = 256
        d["targets"]["min_tokens_per_second"] = 1.0
        (out / f"{name}.toml").write_text(dumps_toml(d))
    return out


def build_args(env: dict, *extra: str) -> list[str]:
    return [
        "build",
        "--model",
        str(env["base"]),
        "--profiles-dir",
        str(env["profiles"]),
        "--cache-dir",
        str(env["cache"]),
        "--eval-text",
        str(env["eval"]),
        *extra,
    ]


def run_cli(args: list[str]) -> None:
    from click.testing import CliRunner

    from edgellm.cli import main

    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def adapter_env(tmp_path_factory, hf_llama_dir) -> dict:
    from edgellm.pipeline.finetune import finetune
    from edgellm.pipeline.lora import LoraConfig
    from edgellm.trust import Repository, init_keys

    d = tmp_path_factory.mktemp("adapters")
    (d / "lamps.txt").write_text("\n".join(lamp_lines(120)))
    (d / "doors.txt").write_text("\n".join(door_lines(120)))
    (d / "eval.txt").write_text("\n".join(lamp_lines(8)))
    for name, text in (("kitchen", "lamps.txt"), ("garage", "doors.txt")):
        finetune(
            hf_llama_dir,
            [str(d / text)],
            d / name,
            LoraConfig(rank=4, alpha=8.0),
            steps=25,
            lr=2e-3,
            batch_size=4,
            seq_len=32,
        )
    root = init_keys(d / "keys")
    Repository.create(d / "repo", d / "keys")
    env = {
        "base": hf_llama_dir,
        "kitchen": d / "kitchen",
        "garage": d / "garage",
        "keys": d / "keys",
        "root": root,
        "repo": d / "repo",
        "profiles": write_profiles(d / "profiles"),
        "cache": d / "cache",
        "eval": d / "eval.txt",
        "dir": d,
    }
    sign = ["--repo", str(env["repo"]), "--keys", str(env["keys"]), "--profile", "test-gguf"]
    run_cli(
        build_args(
            env,
            *sign,
            "--candidates",
            "gguf-f16",
            "--name",
            "tiny",
            "--version",
            "1.0.0",
            "--out",
            str(d / "dist-base"),
        )
    )
    env["base_envelope"] = d / "dist-base" / "tiny-1.0.0-test-gguf.bundle.signed"
    for name in ("kitchen", "garage"):
        run_cli(
            build_args(
                env,
                *sign,
                "--candidates",
                "gguf-f16",
                "--adapter",
                str(env[name]),
                "--name",
                name,
                "--version",
                "0.1.0",
                "--base-name",
                "tiny",
                "--base-version",
                "1.0.0",
                "--out",
                str(d / f"dist-{name}"),
            )
        )
        env[f"{name}_envelope"] = d / f"dist-{name}" / f"{name}-0.1.0-test-gguf.bundle.signed"
    # the same adapter built on another base artifact (Q8_0): this device will not run that base
    run_cli(
        build_args(
            env,
            *sign,
            "--candidates",
            "gguf-q8_0",
            "--adapter",
            str(env["kitchen"]),
            "--name",
            "kitchen",
            "--version",
            "0.2.0",
            "--base-name",
            "tiny",
            "--base-version",
            "1.0.0",
            "--out",
            str(d / "dist-foreign"),
        )
    )
    env["foreign_base_envelope"] = d / "dist-foreign" / "kitchen-0.2.0-test-gguf.bundle.signed"
    return env

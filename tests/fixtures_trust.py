"""Fixtures for the SDK core: bundles, keys, signed repositories (real python-tuf, real files)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def make_bundle_dir(
    path: Path,
    *,
    name: str = "demo",
    version: str = "1.0.0",
    payload: bytes | None = None,
    runtime: str = "gguf",
    extra: dict | None = None,
) -> Path:
    """A bundle source directory with a fake artifact (for packing/trust tests, not inference)."""
    path.mkdir(parents=True, exist_ok=True)
    artifact = "model.gguf" if runtime == "gguf" else "model.onnx"
    (path / artifact).write_bytes(payload if payload is not None else os.urandom(4096))
    (path / "generation.json").write_text(json.dumps({"temperature": 0.0, "max_tokens": 32}))
    manifest = {
        "name": name,
        "version": version,
        "runtime": runtime,
        "artifact": artifact,
        "quantization": "q8_0",
        "profiles": ["rpi5-8gb"],
        "golden_prompts": [{"prompt": "status?", "max_tokens": 8}],
        "metrics": {"perplexity": 3.2},
    }
    manifest.update(extra or {})
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture
def bundle_src(tmp_path: Path) -> Path:
    return make_bundle_dir(tmp_path / "src")


@pytest.fixture
def packed_bundle(tmp_path: Path, bundle_src: Path) -> Path:
    from edgellm.bundle import pack

    return pack(bundle_src, tmp_path / "demo-1.0.0.bundle").path


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    """Keys where targets needs 2 of 3 signatures."""
    from edgellm.trust import init_keys

    init_keys(tmp_path / "keys", thresholds={"targets": 2}, counts={"targets": 3})
    return tmp_path / "keys"


@pytest.fixture
def signed_repo(tmp_path: Path, keys_dir: Path, packed_bundle: Path):
    """A repository with one published bundle. Returns (Repository, root.json path, target name)."""
    from edgellm.trust import Repository

    repo = Repository.create(tmp_path / "repo", keys_dir)
    name = repo.add_bundle(packed_bundle)
    return repo, keys_dir / "root.json", name


def publish_versions(repo, work: Path, versions, *, name: str = "demo") -> list[str]:
    """Publish bundles of ``name`` at ``versions`` (fake artifacts) into ``repo``, a
    :class:`edgellm.trust.Repository` with its keys: versions a rollout may assign."""
    from edgellm.bundle import pack

    return [
        repo.add_bundle(
            pack(make_bundle_dir(work / f"src-{name}-{v}", name=name, version=v), work / f"{name}-{v}.bundle").path
        )
        for v in versions
    ]

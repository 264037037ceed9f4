"""A federated run's result as adapter bundles: a few MB per device instead of the whole model.

For every published GGUF bundle of the run's base version, one adapter bundle named
``federated`` at the run's version: the averaged adapters as llama.cpp's LoRA GGUF
(:func:`edgellm.pipeline.export.gguf_lora.write_lora_gguf`), a manifest naming that bundle's
artifact as its base (:func:`edgellm.pipeline.adapter_build.adapter_manifest`: the base's
profiles, memory, health budgets), golden prompts produced by base + adapter, and the run's
lineage. Devices running exactly that artifact apply it on top (`"model": "tiny:federated"`);
the merged full bundle published beside it serves devices on other bases or runtimes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

ADAPTER_NAME = "federated"


def _state(adapters: Path) -> dict[str, Any]:
    import torch
    from safetensors.numpy import load_file

    return {k: torch.from_numpy(v.copy()) for k, v in load_file(str(adapters)).items()}


def publish_adapters(
    repo: Any,
    bases: list[Any],
    adapters: Path,
    rank: int,
    alpha: float,
    merged_dir: Path,
    *,
    model: str,
    base_version: str,
    version: str,
    lineage: dict[str, Any],
    work: Path,
) -> list[str]:
    """Build, pack and publish one adapter bundle per GGUF base target; returns the target names."""
    from edgellm.bundle import pack, read_manifest, unpack
    from edgellm.pipeline.adapter_build import adapter_manifest
    from edgellm.pipeline.export.gguf_lora import write_lora_gguf
    from edgellm.pipeline.finetune import Adapter
    from edgellm.pipeline.fleet_build import golden_prompts
    from edgellm.trust import canonical_safe, target_custom

    work.mkdir(parents=True, exist_ok=True)
    gguf = work / "adapter.gguf"
    state = _state(adapters)
    export = write_lora_gguf(state, rank, alpha, merged_dir, gguf, dtype="F16", name=ADAPTER_NAME)
    names = []
    for i, base in enumerate(b for b in bases if b.runtime == "gguf"):
        base_manifest = read_manifest(base.path)
        base_dir = work / f"base-{i}"
        shutil.rmtree(base_dir, ignore_errors=True)
        unpack(base.path, base_dir)  # verified against its manifest
        try:
            prompts = [g.prompt for g in base_manifest.golden_prompts if not g.chat] or ["Hello"]
            golden = golden_prompts("gguf", base_dir / base_manifest.artifact, prompts, base_dir, adapter=gguf)
        finally:
            shutil.rmtree(base_dir, ignore_errors=True)
        targets = tuple(sorted({k.rsplit(".", 2)[-2] for k in state}))
        ad = Adapter(
            rank=rank,
            alpha=alpha,
            targets=targets,
            state={},
            base_sha256=base.artifact_sha256,
            base_name=model,
            report={},
        )
        manifest = adapter_manifest(
            base_manifest.to_dict(),
            name=ADAPTER_NAME,
            version=version,
            base_name=model,
            base_version=base_version,
            base_sha256=base.artifact_sha256,
            adapter=ad,
            export=export,
            golden=golden,
        )
        manifest["lineage"]["federated"] = lineage["federated"]
        src = work / f"src-{i}"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir()
        shutil.copyfile(gguf, src / "adapter.gguf")
        (src / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        profile = "-".join(base_manifest.profiles) or base.quantization
        packed = pack(src, work / f"{model}-{ADAPTER_NAME}-{version}-{profile}.bundle")
        custom = target_custom(packed.manifest, packed.sha256)
        custom["edgellm"]["federated"] = canonical_safe(lineage["federated"])
        names.append(repo.add_bundle(packed.path, custom=custom))
        shutil.rmtree(src, ignore_errors=True)
    return names

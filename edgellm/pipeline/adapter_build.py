"""`edgellm build --adapter`: a LoRA adapter shipped as a signed delta on top of a verified base.

    result = run_adapter_build(BuildConfig(model_dir=base, profiles=[...], out_dir=...), "adapters/kitchen",
                               base_version="0.1.0")

Per profile, the base is chosen exactly as ``edgellm build`` chose it (same candidates, same
budget; the candidate cache makes this cheap). Where the chosen base runs on llama.cpp, the bundle
is an *adapter bundle*: the adapter as llama.cpp's LoRA GGUF, golden prompts produced by base +
adapter, and a manifest naming the base by the sha256 of its artifact and its version
(:mod:`edgellm.adapters`). Where the profile's base runs on a runtime that cannot apply adapters
(ONNX), the adapter is folded into the weights and a *merged* full bundle is built instead. Both
are signed and published exactly like full bundles; the report gives the bytes each one puts on
the wire next to what the full bundle would weigh.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edgellm.adapters import ADAPTER_ARTIFACT, KIND_ADAPTER
from edgellm.errors import BuildError
from edgellm.pipeline.fleet_build import (
    _NAME_SAFE,
    BuildConfig,
    BuildResult,
    Packer,
    ProfileResult,
    ProgressFn,
    default_prompts,
    golden_prompts,
    manifest_for,
    prepare_build,
    profile_facts,
    run_build,
    write_reports,
)
from edgellm.pipeline.select import select

#: manifest + tar headers on top of the artifact: what a full bundle adds to its model file
_BUNDLE_OVERHEAD = 16 * 1024


def adapter_manifest(
    base_manifest: dict[str, Any],
    *,
    name: str,
    version: str,
    base_name: str,
    base_version: str,
    base_sha256: str,
    adapter: Any,
    export: dict[str, Any],
    golden: list[dict[str, Any]],
) -> dict[str, Any]:
    """An adapter bundle's manifest from its base bundle's (profiles, memory, health, generation)."""
    m = {k: v for k, v in base_manifest.items() if k not in ("files", "tokenizer")}
    m.update(
        name=name,
        version=version,
        artifact=ADAPTER_ARTIFACT,
        kind=KIND_ADAPTER,
        golden_prompts=golden,
        base={"name": base_name, "version": base_version, "runtime": "gguf", "artifact_sha256": base_sha256},
    )
    mem = dict(m["memory"])
    mem["weights_bytes"] += export["size_bytes"]
    mem["peak_bytes"] += export["size_bytes"]
    m["memory"] = mem
    m["metrics"] = {
        **m["metrics"],
        "adapter": {k: export[k] for k in ("rank", "alpha", "params", "size_bytes")},
        "adapter_val_ppl": adapter.report.get("val_ppl"),
        "base_val_ppl": adapter.report.get("base_val_ppl"),
    }
    lineage = dict(m["lineage"])
    lineage["parent_version"] = base_version
    lineage["data_sha256"] = (adapter.report.get("data") or {}).get("sha256")
    lineage["build_config"] = {
        **lineage["build_config"],
        "adapter": {
            "rank": adapter.rank,
            "alpha": adapter.alpha,
            "targets": list(adapter.targets),
            "base_model_sha256": adapter.base_sha256,
        },
    }
    m["lineage"] = lineage
    return m


def run_adapter_build(
    cfg: BuildConfig,
    adapter_dir: str | Path,
    *,
    base_version: str,
    adapter_name: str | None = None,
    progress: ProgressFn | None = None,
) -> BuildResult:
    from edgellm.pipeline.candidate_cache import hash_model_dir
    from edgellm.pipeline.export.gguf_lora import write_lora_gguf
    from edgellm.pipeline.finetune import load_adapter

    say = progress or (lambda step, i, n: None)
    adapter_dir, model_dir = Path(adapter_dir), Path(cfg.model_dir)
    adapter = load_adapter(adapter_dir)
    if hash_model_dir(model_dir) != adapter.base_sha256:
        raise BuildError(
            f"{adapter_dir} was fine-tuned from another base than {model_dir}",
            hint="pass the --model the adapter was trained on (`edgellm finetune --model`)",
        )
    profiles, base_name, eval_text, cands = prepare_build(cfg, say)
    name = adapter_name or _NAME_SAFE.sub("-", adapter_dir.resolve().name).strip("-.") or "adapter"
    packer = Packer(cfg)
    prompts = cfg.golden_prompts or default_prompts(eval_text)
    results: list[ProfileResult] = []
    merged_profiles: list[str] = []
    with tempfile.TemporaryDirectory(prefix=".adapter-", dir=packer.out) as tmp:
        gguf = Path(tmp) / ADAPTER_ARTIFACT
        export = write_lora_gguf(adapter.state, adapter.rank, adapter.alpha, model_dir, gguf, dtype="F16", name=name)
        golden_cache: dict[str, list[dict[str, Any]]] = {}
        for i, prof in enumerate(profiles):
            say(f"selecting for {prof.name}", i, len(profiles))
            sel = select(prof, cands.measurements.values(), cfg.budget)
            if sel.chosen is not None and cands.measurements[sel.chosen].runtime != "gguf":
                merged_profiles.append(prof.name)  # its base cannot take an adapter: a merged full bundle
                continue
            res = ProfileResult(prof.name, sel, facts=profile_facts(prof), kind=KIND_ADAPTER)
            results.append(res)
            if sel.chosen is None:
                continue
            m = cands.measurements[sel.chosen]
            if m.fmt not in golden_cache:
                golden_cache[m.fmt] = golden_prompts(m.runtime, m.artifact, prompts, model_dir, adapter=gguf)
            from edgellm._fs import sha256_file

            say(f"bundling the adapter for {prof.name} (base {m.fmt})", i, len(profiles))
            manifest = adapter_manifest(
                manifest_for(cfg, name, prof, m, sel, cands, []),
                name=name,
                version=cfg.version,
                base_name=base_name,
                base_version=base_version,
                base_sha256=sha256_file(m.artifact),
                adapter=adapter,
                export=export,
                golden=golden_cache[m.fmt],
            )
            res.full_bundle_bytes = int(m.size_bytes) + _BUNDLE_OVERHEAD
            packer.add(res, f"{name}-{cfg.version}-{prof.name}.bundle", {ADAPTER_ARTIFACT: gguf}, manifest)
        packer.finish()
        merged = (
            _merged_build(cfg, adapter_dir, name, merged_profiles, Path(tmp), progress) if merged_profiles else None
        )
    if merged is not None:
        for r in merged.results:
            r.kind = "merged"
        results += merged.results
    report_json, report_md = write_reports(packer.out, cfg, cands, results)
    return BuildResult(cfg, cands, results, report_json, report_md)


def _merged_build(
    cfg: BuildConfig, adapter_dir: Path, name: str, profiles: list[str], work: Path, progress: ProgressFn | None
) -> BuildResult:
    """A full bundle of the base with the adapter folded in, for profiles whose runtime cannot apply it."""
    import dataclasses

    from edgellm.pipeline.finetune import merge_adapter

    merged_dir = merge_adapter(cfg.model_dir, adapter_dir, work / name)
    mcfg = dataclasses.replace(cfg, model_dir=merged_dir, profiles=profiles, name=name)
    return run_build(mcfg, progress)

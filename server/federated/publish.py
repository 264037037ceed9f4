"""Closing the loop: averaged adapters -> merged model -> bundles per profile -> signed -> canary.

1. The base: of the base version's GGUF targets in the server's repository, the one with the
   highest precision (F32 > F16 > BF16 > Q8_0 > ...) is unpacked (verified against its manifest)
   and read back into a torch model (``edgellm.pipeline.lora.load_gguf_model``). Devices trained
   on whatever artifact their profile runs; LoRA adapters live in the dequantized float domain,
   so they apply to every artifact of the same base. Publish an F16 build of the base (one more
   ``--profile`` or ``--format``) for the best merge.
2. ``apply_lora`` + ``load_lora_state`` (the averaged adapters) + ``merge_lora``: W += B·A·α/r.
3. The merged model is written as a model directory and built for the group's profiles by
   :func:`edgellm.pipeline.fleet_build.run_build` (the path ``edgellm build`` takes), with the
   run's lineage in every manifest.
4. Each bundle is published into the server's TUF repository, its target carrying the lineage
   in ``custom.edgellm.federated``.
5. The averaged adapters are also published as ``federated`` adapter bundles, one per GGUF
   bundle of the base version (:mod:`server.federated.adapter_publish`).
6. Unless the run says ``--no-rollout``, a canary rollout of the new version to the group starts
   (:func:`server.rollout.start`): devices running one of those base artifacts get the adapter,
   the others the merged full bundle (:mod:`server.release`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from edgellm._fs import sha256_file
from server.federated.store import FlError, FlStore

logger = logging.getLogger(__name__)

QUANT_ORDER = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k", "q5_0", "q4_k_m", "q4_k", "q4_0")


@dataclasses.dataclass(frozen=True)
class BaseTarget:
    """One published bundle of the base version."""

    name: str
    path: Path
    profiles: tuple[str, ...]
    runtime: str
    quantization: str
    artifact_sha256: str


def base_targets(repo_dir: Path, model: str, version: str) -> list[BaseTarget]:
    """The repository's bundles of ``model`` ``version`` (manifests read, nothing extracted)."""
    from edgellm.bundle import read_manifest
    from edgellm.trust import Repository

    repo = Repository(repo_dir)
    out = []
    for t in repo.list_targets():
        facts = t.custom.get("edgellm", {})
        if facts.get("name") != model or facts.get("version") != version:
            continue
        path = repo.target_path(t.name)
        m = read_manifest(path)
        out.append(
            BaseTarget(
                t.name, path, tuple(m.profiles), m.runtime, str(m.quantization).lower(), m.file(m.artifact).sha256
            )
        )
    return out


def precision_rank(quantization: str) -> int:
    q = quantization.lower()
    return QUANT_ORDER.index(q) if q in QUANT_ORDER else len(QUANT_ORDER)


def merge_base(targets: list[BaseTarget]) -> BaseTarget:
    gguf = [t for t in targets if t.runtime == "gguf"]
    if not gguf:
        raise FlError(
            "the base version has no GGUF bundle to fine-tune",
            hint="federated fine-tuning needs a llama.cpp (GGUF) build of the base; ONNX devices decline",
        )
    return min(gguf, key=lambda t: (precision_rank(t.quantization), t.name))


def merge_adapters(
    base_bundle: Path, adapters: Path, rank: int, alpha: float, out_dir: Path, extra_files: dict[str, str]
) -> Path:
    """Base bundle + averaged adapters -> a merged model directory (config, safetensors, tokenizer)."""
    import torch
    from safetensors.numpy import load_file

    from edgellm.bundle import unpack
    from edgellm.pipeline.gguf_load import gguf_tokenizer
    from edgellm.pipeline.lora import LoraConfig, apply_lora, load_gguf_model, load_lora_state, merge_lora
    from edgellm.pipeline.model import save_model_dir

    work = out_dir.parent / f".{out_dir.name}.base"
    shutil.rmtree(work, ignore_errors=True)
    manifest = unpack(base_bundle, work)  # verified against its manifest first
    try:
        gguf = work / manifest.artifact
        model = load_gguf_model(gguf)
        apply_lora(model, LoraConfig(rank=rank, alpha=alpha))
        load_lora_state(model, {k: torch.from_numpy(v.copy()) for k, v in load_file(str(adapters)).items()})
        merge_lora(model)
        files = dict(extra_files)
        if (work / "tokenizer.json").is_file():  # the bundle's own tokenizer files travel as they are
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (work / name).is_file():
                    files[name] = (work / name).read_text(encoding="utf-8")
        else:  # the GGUF's vocabulary, with its own special tokens
            tok = gguf_tokenizer(gguf)
            files["tokenizer.json"] = tok.to_str()
            files["tokenizer_config.json"] = json.dumps(_tokenizer_config(gguf, tok, model.config), indent=2)
        return save_model_dir(model, out_dir, extra_files=files, overwrite=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tokenizer_config(gguf: Path, tok: Any, cfg: Any) -> dict[str, Any]:
    """tokenizer_config.json for a GGUF's vocabulary: its BOS/EOS/UNK/PAD tokens, add_bos/add_eos
    and chat template, so the build writes the same tokenizer metadata back into new GGUFs."""
    from edgellm.pipeline.gguf_load import _field, _reader

    reader = _reader(gguf)
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    for key, gkey in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        tid = _field(reader, f"tokenizer.ggml.{gkey}")
        token = tok.id_to_token(int(tid)) if isinstance(tid, int) else None
        if token is not None:
            out[key] = token
    for key in ("add_bos_token", "add_eos_token"):
        v = _field(reader, f"tokenizer.ggml.{key}")
        if isinstance(v, bool):
            out[key] = v
    template = _field(reader, "tokenizer.chat_template")
    if isinstance(template, str) and template:
        out["chat_template"] = template
    return out


def lineage(fl: FlStore, run: dict[str, Any]) -> dict[str, Any]:
    """What a published version records about the run that made it. Contributors are the devices
    whose update was averaged in at least one round (the ledger has a row for each)."""
    s = run["settings"]
    contributed = {e["device"] for e in fl.ledger(run_id=run["id"])}
    devices = [d for d in fl.devices(run["id"]) if d["device"] in contributed]
    eps = {d["device"]: fl.epsilon(d["device"], s.delta) for d in devices}
    return {
        "parent_version": run["base_version"],
        "federated": {
            "run": run["id"],
            "base_version": run["base_version"],
            "rounds": s.rounds,
            "devices": len(devices),
            "device_data_sha256": {d["device"]: d["data_sha256"] for d in devices},
            "epsilon": {k: (v if v != float("inf") else "inf") for k, v in eps.items()},
            "delta": s.delta,
            "dp_noise": s.dp_noise,
            "dp_clip": s.dp_clip,
            "adapters_sha256": (run["result"] or {}).get("adapters_sha256"),
        },
    }


def close_loop(fl: FlStore, data_root: Path, keys: Path, repo_dir: Path, run_id: str) -> dict[str, Any]:
    """Merge, build, publish and (unless --no-rollout) start the canary. Returns what was done."""
    from edgellm.pipeline.fleet_build import BuildConfig, run_build
    from edgellm.trust import Repository, canonical_safe, target_custom
    from server import rollout

    run = fl.run(run_id)
    s, plan, result = run["settings"], run["plan"], run["result"] or {}
    adapters = Path(result.get("adapters", ""))
    if not adapters.is_file() or sha256_file(adapters) != result.get("adapters_sha256"):
        raise FlError(f"averaged adapters of {run_id} are missing or changed on disk", hint="start a new run")
    base = next(
        (t for t in base_targets(repo_dir, run["model"], run["base_version"]) if t.name == plan["merge_target"]), None
    )
    if base is None:
        raise FlError(f"base target {plan['merge_target']} left the repository", hint="republish the base version")
    lin = lineage(fl, run)
    work = adapters.parent
    merged = merge_adapters(
        base.path,
        adapters,
        s.lora_rank,
        s.lora_alpha,
        work / "merged",
        {"federated_lineage.json": json.dumps(lin, indent=2, sort_keys=True)},
    )
    profiles = sorted({d["profile"] for d in fl.store.reopen().devices(group=run["grp"]) if d["profile"]}) or list(
        base.profiles
    )
    built = run_build(
        BuildConfig(
            model_dir=merged,
            profiles=profiles,
            out_dir=work / "dist",
            name=run["model"],
            version=run["version"],
            lineage=lin,
        )
    )
    repo = Repository(repo_dir, keys)
    targets = []
    for r in built.results:
        if r.bundle is None:
            continue
        from edgellm.bundle import read_manifest

        custom = target_custom(read_manifest(r.bundle), sha256_file(r.bundle))
        custom["edgellm"]["federated"] = canonical_safe(lin["federated"])
        targets.append(repo.add_bundle(r.bundle, custom=custom))
    if not targets:
        refusals = "; ".join(f"{r.profile}: {r.selection.refusal}" for r in built.refused)
        raise FlError(
            f"no profile of group {run['grp']} could take the merged model ({refusals})",
            hint="see the build report in " + str(work / "dist"),
        )
    adapter_targets = _publish_adapters(repo, repo_dir, run, adapters, merged, lin, work)
    rid = None
    if s.rollout:
        rid = rollout.start(
            fl.store,
            model=run["model"],
            version=run["version"],
            group=run["grp"],
            canary=s.canary,
            gate=s.gate or None,
            no_gate=not s.gate,
            bake=s.bake,
            # devices running a base artifact an adapter was built on take it; the others the merged bundle
            adapter=_adapter_name() if adapter_targets else None,
        )
    digest = hashlib.sha256(json.dumps(lin, sort_keys=True).encode()).hexdigest()
    return {
        "targets": targets,
        "adapter_targets": adapter_targets,
        "profiles": profiles,
        "rollout": rid,
        "lineage_sha256": digest,
        "merge_base": base.name,
    }


def _adapter_name() -> str:
    from server.federated.adapter_publish import ADAPTER_NAME

    return ADAPTER_NAME


def _publish_adapters(
    repo: Any, repo_dir: Path, run: dict[str, Any], adapters: Path, merged: Path, lin: dict[str, Any], work: Path
) -> list[str]:
    """The result as adapter bundles beside the merged full ones; a failure here loses only the adapters."""
    from server.federated.adapter_publish import publish_adapters

    s = run["settings"]
    try:
        return publish_adapters(
            repo,
            base_targets(repo_dir, run["model"], run["base_version"]),
            adapters,
            s.lora_rank,
            s.lora_alpha,
            merged,
            model=run["model"],
            base_version=run["base_version"],
            version=run["version"],
            lineage=lin,
            work=work / "adapters",
        )
    except Exception as e:  # noqa: BLE001 - the merged full bundles are published already
        logger.warning("run %s: adapter bundles not published (%s); devices take the merged bundles", run["id"], e)
        return []

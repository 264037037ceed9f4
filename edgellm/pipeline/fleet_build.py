"""The profile-aware build: model dir + hardware profiles -> one bundle per profile + a report.

    result = run_build(BuildConfig(model_dir=..., profiles=["rpi5-8gb", ...], out_dir=...))

Steps: load the profiles; build and measure the candidates the profiles' runtimes allow
(:mod:`edgellm.pipeline.candidates`, cached by content hash); choose per profile
(:mod:`edgellm.pipeline.select`); pack one bundle per served profile with memory figures,
metrics, generation defaults and golden prompts for the device's health check; write
``report.json`` and ``report.md``; optionally publish and sign each bundle in a TUF repository
and put the signed envelope (bundle + the metadata that verifies it, installable offline) in
the output directory.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgellm.errors import BuildError
from edgellm.pipeline.candidates import (
    ALL_FORMATS,
    DEFAULT_EVAL_TEXT,
    GGUF_FORMATS,
    ONNX_FORMATS,
    RUNTIME_NAMES,
    CandidateSet,
    Measurement,
    build_candidates,
    kind_of,
)
from edgellm.pipeline.evaluate import train_report
from edgellm.pipeline.model_check import check_model_dir
from edgellm.pipeline.select import Budget, Selection, select
from edgellm.pipeline.tokenizer import tokenizer_json_text
from edgellm.runtime.settings import for_profile

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
_NAME_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "edgellm" / "candidates"


@dataclasses.dataclass
class BuildConfig:
    model_dir: Path
    profiles: list[str]
    out_dir: Path
    name: str | None = None
    version: str = "0.1.0"
    formats: list[str] | None = None  # default: every format the profiles' runtimes allow
    budget: Budget = dataclasses.field(default_factory=Budget)
    eval_text: str | None = None
    cache_dir: Path | None = None
    profiles_dir: Path | None = None
    repo: Path | None = None
    keys: Path | None = None
    threads: int = 1
    golden_prompts: list[str] | None = None
    lineage: dict[str, Any] | None = None  # merged into each manifest's lineage (e.g. a federated run's)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["budget"] = self.budget.to_dict()
        d["eval_text"] = None if self.eval_text is None else f"<{len(self.eval_text)} chars>"
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


@dataclasses.dataclass
class ProfileResult:
    profile: str
    selection: Selection
    bundle: Path | None = None
    bundle_sha256: str | None = None
    target: str | None = None
    signed: bool = False
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)  # the profile's figures used
    kind: str = "full"  # "full", "adapter" or "merged" (a full bundle with an adapter folded in)
    full_bundle_bytes: int | None = None  # an adapter's: what the full bundle it replaces would weigh
    target_bytes: int | None = None  # the published TUF target's length: what an online update downloads


def wire_bytes(r: ProfileResult) -> dict[str, Any]:
    """Bytes a device downloads for this profile's bundle (the signed envelope when signed; and,
    once published, ``target_bytes``: the TUF target length, what a rollout plans per device)."""
    n = r.bundle.stat().st_size if r.bundle is not None and r.bundle.exists() else None
    full = r.full_bundle_bytes if r.full_bundle_bytes is not None else n
    return {
        "bundle_bytes": n,
        "full_bundle_bytes": full,
        "ratio": (n / full) if n is not None and full else None,
        "target_bytes": r.target_bytes,
    }


@dataclasses.dataclass
class BuildResult:
    config: BuildConfig
    candidates: CandidateSet
    results: list[ProfileResult]
    report_json: Path
    report_md: Path

    @property
    def refused(self) -> list[ProfileResult]:
        return [r for r in self.results if r.selection.chosen is None]


def _formats_for(profiles: list[Any], requested: list[str] | None, pin: str | None) -> list[str]:
    if requested:
        for f in requested:
            kind_of(f)
        fmts = list(requested)
    else:
        runtimes = set().union(*(p.runtimes for p in profiles)) if profiles else set()
        fmts = [f for f in ALL_FORMATS if RUNTIME_NAMES[kind_of(f)] in runtimes]
        if not fmts:  # nobody can run anything: still measure GGUF to say what would fit
            fmts = list(GGUF_FORMATS)
    if pin:
        kind_of(pin)
        if pin not in fmts:
            fmts.append(pin)
    if any(f in ONNX_FORMATS for f in fmts) and not _onnx_available():
        log.warning("ONNX candidates skipped: the ONNX exporter is not available in this build")
        fmts = [f for f in fmts if f not in ONNX_FORMATS]
    return fmts


def _onnx_available() -> bool:
    from edgellm.pipeline.candidates import onnx_supported

    return onnx_supported()


def golden_prompts(
    runtime: str, artifact: str | Path, prompts: list[str], model_dir: Path, adapter: Path | None = None
) -> list[dict[str, Any]]:
    """Greedy continuations of a few prompts with the chosen artifact (+ ``adapter``, a LoRA GGUF);
    ``expect`` holds the confident prefix (every token at p > 0.6), so the device health check
    catches garbage."""
    from edgellm.runtime import GenerationParams, load_runtime

    out = []
    try:
        rt = load_runtime(runtime, artifact, model_dir=model_dir, threads=1, context_length=256)
    except Exception as e:  # noqa: BLE001 - no runtime here: prompts without expectations
        log.warning("golden prompts without expected text (%s runtime unavailable: %s)", runtime, e)
        return [{"prompt": p, "max_tokens": 8, "expect": None} for p in prompts]
    try:
        if adapter is not None:
            from edgellm.runtime.lora import LoraAdapters

            lora = LoraAdapters(rt)
            lora.load("adapter", adapter)
            lora.activate("adapter")
        for p in prompts:
            c = rt.complete(p, GenerationParams(max_tokens=8))
            keep = 0
            for lp in c.logprobs:
                if lp is None or math.isnan(lp) or lp < math.log(0.6):
                    break
                keep += 1
            expect = rt.detokenize(c.token_ids[:keep]).strip() if keep else ""
            out.append({"prompt": p, "max_tokens": 8, "expect": expect if len(expect) >= 2 else None})
    finally:
        rt.close()
    return out


def default_eval_text(model_dir: Path, max_chars: int = 6000) -> str:
    """The validation split of the data the model was trained on (from its train report, via
    build pipeline I's data loader), else a built-in paragraph."""
    from edgellm.pipeline.data import load_dataset
    from edgellm.pipeline.evaluate import training_data

    sources = training_data(model_dir)
    try:
        val = load_dataset(sources).val if sources else []
    except (OSError, ValueError, BuildError) as e:
        log.info("evaluation text: training data unavailable (%s); using the built-in text", e)
        val = []
    if val:
        return "\n".join(val)[:max_chars]
    return DEFAULT_EVAL_TEXT


def default_prompts(eval_text: str, n: int = 3) -> list[str]:
    """The first half of the first few lines of the evaluation text (what the model should know)."""
    out = []
    for line in eval_text.splitlines():
        words = line.split()
        if len(words) >= 4:
            out.append(" ".join(words[: max(3, len(words) // 2)]))
        if len(out) == n:
            break
    return out or [" ".join(eval_text.split()[:6]) or "Hello"]


def manifest_for(
    cfg: BuildConfig,
    name: str,
    profile: Any,
    m: Measurement,
    sel: Selection,
    cands: CandidateSet,
    golden: list[dict[str, Any]],
) -> dict[str, Any]:
    v = sel.verdict(m.fmt)
    artifact = "model.gguf" if m.runtime == "gguf" else "model.onnx"
    return {
        "name": name,
        "version": cfg.version,
        "runtime": m.runtime,
        "artifact": artifact,
        "quantization": m.fmt.split("-", 1)[1],
        "profiles": [profile.name],
        "tokenizer": None if m.runtime == "gguf" else "tokenizer.json",
        "memory": {k: v.memory[k] for k in ("weights_bytes", "kv_cache_bytes", "context_length", "peak_bytes")},
        "metrics": {
            "perplexity": m.perplexity,
            "reference_perplexity": m.reference_perplexity,
            "kl_divergence": m.kl_divergence,
            "top1_agreement": m.top1_agreement,
            "quality_loss": m.quality_loss,
            "size_bytes": m.size_bytes,
            "decode_tokens_per_second_here": m.decode_tokens_per_second,
            "bandwidth_here_gbps": m.bandwidth_here_gbps,
            "efficiency": m.efficiency,
            "profile_bandwidth_gbps": profile.bandwidth_gbps,
            "predicted_tokens_per_second": v.predicted_tokens_per_second,
        },
        "generation": {
            "temperature": 0.7,
            "top_p": 0.95,
            "top_k": 40,
            "max_tokens": 128,
            "stop": [],
            "threads": profile.threads,
            "context_length": v.memory["context_length"],
        },
        "lineage": {
            "parent_version": None,
            "data_sha256": (train_report(cfg.model_dir).get("data") or {}).get("sha256"),
            "build_config": {
                "model_sha256": cands.model_sha256,
                "format": m.fmt,
                "candidate_key": m.cache_key,
                "budget": cfg.budget.to_dict(),
                "eval_sha256": cands.eval_sha256,
            },
            **(cfg.lineage or {}),
        },
        "runtime_settings": for_profile(profile, m.runtime).to_dict(),
        "golden_prompts": golden,
        "health": {
            "min_tokens_per_second": profile.min_tokens_per_second,
            "max_load_seconds": 60,
            "max_memory_bytes": int(profile.usable_ram_bytes),
        },
    }


def prepare_build(cfg: BuildConfig, say: ProgressFn) -> tuple[list[Any], str, str, CandidateSet]:
    """Check the config, load the profiles, build and measure the candidates:
    (profiles, bundle name, evaluation text, candidates)."""
    from edgellm.profiles import get_profile

    model_dir = Path(cfg.model_dir)
    check_model_dir(model_dir)  # family, tokenizer, chat template: refused here, before any work
    if not cfg.profiles:
        raise BuildError("no --profile given", hint="pass one --profile per device class, see `edgellm profiles list`")
    if (cfg.repo is None) != (cfg.keys is None):
        raise BuildError("--repo and --keys go together", hint="pass both to publish and sign, or neither")
    profiles = [get_profile(p, cfg.profiles_dir) for p in dict.fromkeys(cfg.profiles)]
    name = cfg.name or _NAME_SAFE.sub("-", model_dir.resolve().name).strip("-.") or "model"
    eval_text = cfg.eval_text if cfg.eval_text is not None else default_eval_text(model_dir)
    formats = _formats_for(profiles, cfg.formats, cfg.budget.pin_format)

    cands = build_candidates(
        model_dir,
        formats,
        cache_dir=cfg.cache_dir or default_cache_dir(),
        eval_text=eval_text,
        threads=cfg.threads,
        progress=say,
    )
    if not cands.measurements:
        raise BuildError(
            "no candidate could be built: " + "; ".join(f"{k}: {v}" for k, v in cands.failures.items()),
            hint="check the model directory; run with -v for details",
        )
    return profiles, name, eval_text, cands


def profile_facts(prof: Any) -> dict[str, Any]:
    return {
        "display_name": prof.display_name,
        "usable_ram_bytes": int(prof.usable_ram_bytes),
        "bandwidth_gbps": prof.bandwidth_gbps,
        "min_tokens_per_second": prof.min_tokens_per_second,
        "context_length": prof.context_length,
        "threads": prof.threads,
        "runtimes": sorted(prof.runtimes),
    }


class Packer:
    """Packs bundles into DIST; with a repository, publishes and signs them all in one transaction."""

    def __init__(self, cfg: BuildConfig) -> None:
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.repo = None
        if cfg.repo is not None:
            from edgellm.trust import Repository

            self.repo = Repository(cfg.repo, cfg.keys)
        self.signing: list[tuple[ProfileResult, Path, str]] = []  # signed together at the end
        self.stage = tempfile.TemporaryDirectory(prefix=".signing-", dir=self.out)  # removed even on error

    def add(
        self,
        res: ProfileResult,
        bundle_name: str,
        files: dict[str, Path],
        manifest: dict[str, Any],
        texts: dict[str, str] | None = None,
    ) -> None:
        """Pack ``files`` (bundle path -> source file, hard-linked when possible) and ``texts``
        (bundle path -> content) with ``manifest``."""
        from edgellm.bundle import pack

        with tempfile.TemporaryDirectory(prefix=".bundle-", dir=self.out) as tmp:
            src = Path(tmp) / "src"
            src.mkdir()
            for rel, path in files.items():
                try:
                    os.link(path, src / rel)
                except OSError:
                    shutil.copyfile(path, src / rel)
            for rel, text in (texts or {}).items():
                (src / rel).write_text(text, encoding="utf-8")
            (src / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            packed = pack(src, Path(tmp) / bundle_name)
            res.bundle_sha256 = packed.sha256
            if self.repo is not None:
                self.signing.append((res, Path(self.stage.name) / bundle_name, bundle_name))
                os.replace(packed.path, self.signing[-1][1])
            else:
                res.bundle = self.out / bundle_name
                os.replace(packed.path, res.bundle)

    def finish(self) -> None:
        if self.repo is not None:
            publish_signed(self.repo, self.signing, self.out)
        self.stage.cleanup()


def bundle_files(m: Measurement, model_dir: Path) -> dict[str, Path]:
    """A full bundle's files: the artifact, plus the tokenizer files an ONNX model needs."""
    files = {("model.gguf" if m.runtime == "gguf" else "model.onnx"): Path(m.artifact)}
    if m.runtime == "onnx":
        for f in ("tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
            if (model_dir / f).is_file():
                files[f] = model_dir / f
    return files


def bundle_texts(m: Measurement, model_dir: Path) -> dict[str, str]:
    """An ONNX bundle's tokenizer.json (converted when the model has only tokenizer.model)."""
    return {"tokenizer.json": tokenizer_json_text(model_dir)} if m.runtime == "onnx" else {}


def run_build(cfg: BuildConfig, progress: ProgressFn | None = None) -> BuildResult:
    say = progress or (lambda step, i, n: None)
    model_dir = Path(cfg.model_dir)
    profiles, name, eval_text, cands = prepare_build(cfg, say)
    packer = Packer(cfg)
    prompts = cfg.golden_prompts or default_prompts(eval_text)
    results: list[ProfileResult] = []
    n = len(profiles)
    golden_cache: dict[str, list[dict[str, Any]]] = {}
    for i, prof in enumerate(profiles):
        say(f"selecting for {prof.name}", i, n)
        sel = select(prof, cands.measurements.values(), cfg.budget)
        res = ProfileResult(prof.name, sel, facts=profile_facts(prof))
        results.append(res)
        if sel.chosen is None:
            log.warning("%s", sel.refusal)
            continue
        m = cands.measurements[sel.chosen]
        if m.fmt not in golden_cache:
            golden_cache[m.fmt] = golden_prompts(m.runtime, m.artifact, prompts, model_dir)
        say(f"bundling {prof.name} ({m.fmt})", i, n)
        packer.add(
            res,
            f"{name}-{cfg.version}-{prof.name}.bundle",
            bundle_files(m, model_dir),
            manifest_for(cfg, name, prof, m, sel, cands, golden_cache[m.fmt]),
            texts=bundle_texts(m, model_dir),
        )
    packer.finish()
    report_json, report_md = write_reports(packer.out, cfg, cands, results)
    return BuildResult(cfg, cands, results, report_json, report_md)


def publish_signed(repo: Any, signing: list[tuple[ProfileResult, Path, str]], out: Path) -> None:
    """Publish every bundle and put its signed envelope in DIST (named as `repo add --export` does).

    One repository transaction: the repository changes only if every envelope was written, and
    the envelopes appear only once the repository has their targets.
    """
    with repo.transaction():
        for res, path, _ in signing:
            res.target = repo.add_bundle(path)
            res.target_bytes = path.stat().st_size
        for res, _, bundle_name in signing:  # all carry the final metadata: installable in any order
            res.bundle = repo.export_signed(res.target, out / f"{bundle_name}.signed")
    for res, _, _ in signing:
        res.signed = True


# --------------------------------------------------------------------------- reports


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def report_dict(cfg: BuildConfig, cands: CandidateSet, results: list[ProfileResult]) -> dict[str, Any]:
    return {
        "format": "edgellm-build-report",
        "version": 1,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "dir": str(cands.model_dir),
            "sha256": cands.model_sha256,
            "reference": cands.reference,
            **check_model_dir(cands.model_dir),
        },
        "machine": {"bandwidth_gbps": cands.bandwidth_here_gbps, "bandwidth": cands.bandwidth, "threads": cfg.threads},
        "config": cfg.to_dict(),
        "candidates": [m.to_dict() for m in cands.measurements.values()],
        "failed_candidates": cands.failures,
        "profiles": [
            {
                **r.selection.to_dict(),
                "bundle": None if r.bundle is None else r.bundle.name,
                "bundle_sha256": r.bundle_sha256,
                "target": r.target,
                "signed": r.signed,
                "facts": r.facts,
                "kind": r.kind,
                "wire": wire_bytes(r),
            }
            for r in results
        ],
    }


_TEMPLATE_NAMES = {
    "model": "the model's own",
    "edgellm": "edgellm's role markers",
    "none": "none (chat refused on devices)",
}


def report_markdown(rep: dict[str, Any]) -> str:
    lines = [
        f"# Build report: {Path(rep['model']['dir']).name}",
        "",
        f"Model sha256 `{rep['model']['sha256'][:16]}…`; memory bandwidth measured here: "
        f"**{rep['machine']['bandwidth_gbps']:.2f} GB/s** (1 thread). Quality is measured against the "
        f"unquantized model (F32 in llama.cpp); tokens/s on each profile are predicted by the roofline: "
        f"efficiency here × profile bandwidth ÷ bytes read per token.",
        "",
        f"Family {rep['model'].get('architecture')}, {rep['model'].get('tokenizer')}, chat template: "
        f"{_TEMPLATE_NAMES.get(rep['model'].get('chat_template'), 'unknown')}.",
        *(f"- warning: {w}" for w in rep["model"].get("warnings") or []),
        "",
        "## Candidates",
        "",
        "| format | size MiB | weights MiB | bytes/token MiB | ppl | ppl Δ | KL | top-1 | tok/s here | efficiency | fallbacks | cached |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for c in rep["candidates"]:
        fb = c.get("export", {}).get("fallbacks") or []
        lines.append(
            f"| {c['fmt']} | {_mib(c['size_bytes'])} | {_mib(c['memory']['weights_bytes'])} | "
            f"{_mib(c['bytes_per_token'])} | {c['perplexity']:.3f} | {c['quality_loss']:+.2%} | "
            f"{c['kl_divergence']:.5f} | {c['top1_agreement']:.1%} | {c['decode_tokens_per_second']:.0f} | "
            f"{c['efficiency']:.1%} | {len(fb) or '-'} | {'yes' if c.get('cached') else 'no'} |"
        )
    for fmt, why in rep["failed_candidates"].items():
        lines.append(f"| {fmt} | failed: {why} |")
    for p in rep["profiles"]:
        lines += ["", f"## {p['profile']}", ""]
        f = p.get("facts") or {}
        if f:
            lines += [
                f"{f['display_name']}: usable RAM {_mib(f['usable_ram_bytes'])} MiB, bandwidth "
                f"{f['bandwidth_gbps']:g} GB/s, target {f['min_tokens_per_second']:g} tok/s at "
                f"{f['context_length']} tokens of context, {f['threads']} threads, runtimes: "
                f"{', '.join(f['runtimes']) or 'none'}.",
                "",
            ]
        if p["chosen"]:
            lines.append(
                f"**Chosen: {p['chosen']}** → `{p['bundle']}`" + (" (signed, installs offline)" if p["signed"] else "")
            )
            w = p.get("wire") or {}
            if w.get("bundle_bytes") is not None:
                lines += [
                    "",
                    f"On the wire: {_mib(w['bundle_bytes'])} MiB ({p.get('kind', 'full')} bundle)"
                    + (
                        f", {w['ratio']:.1%} of the full bundle's {_mib(w['full_bundle_bytes'])} MiB"
                        if p.get("kind") == "adapter" and w.get("ratio") is not None
                        else ""
                    )
                    + ".",
                ]
        else:
            lines.append(f"**Refused:** {p['refusal']}")
        lines += [
            "",
            "| format | peak MiB (+headroom) | usable MiB | predicted tok/s | target | ppl Δ | verdict |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for v in p["verdicts"]:
            verdict = "**chosen**" if v["chosen"] else ("; ".join(v["reasons"]) or "eligible")
            lines.append(
                f"| {v['fmt']} | {_mib(v['required_bytes'])} | {_mib(v['usable_bytes'])} | "
                f"{v['predicted_tokens_per_second']:.1f} | {v['target_tokens_per_second']:g} | "
                f"{v['quality_loss']:+.2%} | {verdict} |"
            )
    fallbacks = [(c["fmt"], f) for c in rep["candidates"] for f in c.get("export", {}).get("fallbacks") or []]
    if fallbacks:
        lines += ["", "## Quantization fallbacks", ""]
        lines += [
            f"- {fmt}: `{f['tensor']}` is {f['type']} instead of {f['expected']} ({f['reason']})"
            for fmt, f in fallbacks
        ]
    return "\n".join(lines) + "\n"


def write_reports(out: Path, cfg: BuildConfig, cands: CandidateSet, results: list[ProfileResult]) -> tuple[Path, Path]:
    from edgellm.bundle import atomic_write

    rep = report_dict(cfg, cands, results)
    rj, rm = out / "report.json", out / "report.md"
    atomic_write(rj, (json.dumps(rep, indent=2, sort_keys=True) + "\n").encode())
    atomic_write(rm, report_markdown(rep).encode())
    return rj, rm

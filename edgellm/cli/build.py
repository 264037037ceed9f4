"""`edgellm build` — one bundle per hardware profile, with a report of every candidate."""

from __future__ import annotations

from pathlib import Path

import click

from edgellm.cli._common import echo_json, format_option
from edgellm.formats import ALL_FORMATS

#: exit status of `edgellm build --strict` when a profile was refused
EXIT_REFUSED = 2


def _fraction(text: str | None) -> float | None:
    """'5%' or '0.05' -> 0.05."""
    if text is None:
        return None
    t = text.strip()
    try:
        return float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a fraction (0.05) or a percentage (5%)") from None


@click.command("build")
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="HF-format model directory (config.json, *.safetensors, tokenizer.json).",
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    required=True,
    help="Hardware profile to build for (repeat for a fleet); see `edgellm profiles list`.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the bundles, report.md and report.json.",
)
@click.option(
    "--repo",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="TUF repository to publish into (with --keys); DIST then holds signed bundles.",
)
@click.option(
    "--keys",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Keys directory made by `edgellm keys init`.",
)
@click.option(
    "--name",
    default=None,
    help="Bundle/model name (default: the model directory's name; with --adapter: the adapter's).",
)
@click.option("--version", "version", default="0.1.0", show_default=True)
@click.option(
    "--adapter",
    "adapter",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="LoRA adapter directory from `edgellm finetune`: build adapter bundles on MODEL's base "
    "(merged full bundles for runtimes that cannot apply adapters).",
)
@click.option(
    "--base-version",
    default="0.1.0",
    show_default=True,
    help="With --adapter: the version of the base bundle the adapter applies to.",
)
@click.option("--base-name", default=None, help="With --adapter: the base bundle's name (default: MODEL's name).")
@click.option(
    "--candidates",
    "candidates",
    default=None,
    help=f"Comma-separated formats to consider (default: all the profiles' runtimes allow: {', '.join(ALL_FORMATS)}).",
)
@click.option("--pin-format", type=click.Choice(ALL_FORMATS), default=None, help="Only ever choose this format.")
@click.option(
    "--max-quality-loss",
    default=None,
    help="Largest perplexity increase accepted vs the unquantized model, e.g. 5% or 0.05.",
)
@click.option(
    "--min-tokens-per-second",
    type=float,
    default=None,
    help="Speed target for every profile (default: each profile's own target).",
)
@click.option("--headroom", default="10%", show_default=True, help="Memory kept free on top of the estimate.")
@click.option(
    "--eval-text",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Text file for perplexity / KL / top-1 measurements (default: a built-in paragraph).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Candidate cache (default: ~/.cache/edgellm/candidates).",
)
@click.option(
    "--profiles-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder of profile *.toml files (default: the shipped hardware_profiles).",
)
@click.option("--threads", type=int, default=1, show_default=True, help="Threads for measurements here.")
@click.option(
    "--strict",
    is_flag=True,
    help=f"Exit with status {EXIT_REFUSED} if any profile is refused (for CI that needs every profile built).",
)
@format_option
def build_cmd(
    model_dir: Path,
    profiles: tuple[str, ...],
    out_dir: Path,
    repo: Path | None,
    keys: Path | None,
    name: str | None,
    version: str,
    adapter: Path | None,
    base_version: str,
    base_name: str | None,
    candidates: str | None,
    pin_format: str | None,
    max_quality_loss: str | None,
    min_tokens_per_second: float | None,
    headroom: str,
    eval_text: Path | None,
    cache_dir: Path | None,
    profiles_dir: Path | None,
    threads: int,
    strict: bool,
    fmt: str,
) -> None:
    """Build the right bundle for each hardware PROFILE from MODEL_DIR.

    Exports and quantizes candidates (cached by content hash), measures quality, size, memory and
    speed, picks per profile the candidate that fits its RAM, meets its speed target and loses
    least quality, and writes one bundle per profile plus report.md and report.json. A profile
    nothing fits is refused, with what would fit, in the output and the report; the command still
    succeeds (exit 0) unless --strict is given (then exit status 2).
    """
    from edgellm.pipeline.fleet_build import BuildConfig, run_build, wire_bytes
    from edgellm.pipeline.progress import progress_reporter, step_callback
    from edgellm.pipeline.select import Budget

    budget = Budget(
        headroom=_fraction(headroom) or 0.0,
        max_quality_loss=_fraction(max_quality_loss),
        min_tokens_per_second=min_tokens_per_second,
        pin_format=pin_format,
    )
    cfg = BuildConfig(
        model_dir=model_dir,
        profiles=list(profiles),
        out_dir=out_dir,
        name=base_name if adapter else name,
        version=version,
        formats=[c.strip() for c in candidates.split(",") if c.strip()] if candidates else None,
        budget=budget,
        eval_text=eval_text.read_text(encoding="utf-8") if eval_text else None,
        cache_dir=cache_dir,
        profiles_dir=profiles_dir,
        repo=repo,
        keys=keys,
        threads=threads,
    )
    # JSON output is for machines reading stdout; people and logs get progress on stderr
    with progress_reporter("build", 1, enabled=fmt != "json") as bar:
        if adapter is not None:
            from edgellm.pipeline.adapter_build import run_adapter_build

            result = run_adapter_build(
                cfg, adapter, base_version=base_version, adapter_name=name, progress=step_callback(bar)
            )
        else:
            result = run_build(cfg, progress=step_callback(bar))

    if fmt == "json":
        import json

        echo_json(json.loads(result.report_json.read_text()))
    else:
        for r in result.results:
            sel = r.selection
            if sel.chosen:
                v = sel.verdict(sel.chosen)
                wire = wire_bytes(r)
                click.echo(
                    f"{r.profile:<24} {sel.chosen:<12} {(wire['bundle_bytes'] or 0) / 2**20:8.2f} MiB  "
                    f"ppl {v.quality_loss:+.2%}  ~{v.predicted_tokens_per_second:.0f} tok/s  -> {r.bundle}"
                    + ("  (signed)" if r.signed else "")
                    + (
                        f"  [{r.kind}: {wire['bundle_bytes'] / 2**20:.2f} MiB on the wire, "
                        f"{wire['ratio']:.1%} of the full bundle]"
                        if r.kind == "adapter" and wire["ratio"]
                        else ""
                    )
                )
            else:
                click.echo(f"{r.profile:<24} REFUSED: {sel.refusal}")
        click.echo(f"report: {result.report_md} and {result.report_json}")
    if result.refused and strict:
        raise SystemExit(EXIT_REFUSED)


commands: list = [build_cmd]

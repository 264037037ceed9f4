"""`edgellm profiles` commands: list, show, detect; each takes ``--format json``."""

from __future__ import annotations

from pathlib import Path

import click

from edgellm._fs import atomic_write
from edgellm.cli._common import echo_json, format_option

dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of *.toml profiles (default: $EDGELLM_PROFILES_DIR or the shipped hardware_profiles/).",
)


def _gb(nbytes: int) -> str:
    gib = nbytes / 1024**3
    return f"{gib:.3g} GiB" if gib >= 1 else f"{nbytes / 1024**2:.0f} MiB"


def _console():
    import sys

    from rich.console import Console

    # Piped output (CI logs, `| less`) would otherwise be squeezed into 80 columns.
    return Console(width=None if sys.stdout.isatty() else 160)


@click.group("profiles")
def profiles_group() -> None:
    """Hardware profiles: the device classes builds are fitted to."""


@profiles_group.command("list")
@format_option
@dir_option
def list_cmd(fmt: str, directory: Path | None) -> None:
    """List the known hardware profiles."""
    from rich.table import Table

    from edgellm.profiles import load_profiles

    profiles = load_profiles(directory)
    if fmt == "json":
        echo_json([p.summary() for p in profiles.values()])
        return
    if not profiles:
        click.echo("no profiles found")
        return
    table = Table(title="Hardware profiles")
    for col in ("name", "class", "RAM", "usable", "GB/s", "cores", "ISA", "runtimes", "target tok/s"):
        table.add_column(col, justify="right" if col in ("RAM", "usable", "GB/s", "cores", "target tok/s") else "left")
    for p in profiles.values():
        table.add_row(
            p.name,
            p.device_class,
            _gb(p.ram_bytes),
            _gb(p.usable_ram_bytes),
            f"{p.bandwidth_gbps:g}",
            str(p.cores),
            ",".join(p.to_dict()["cpu"]["isa"]) or "-",
            ",".join(sorted(p.runtimes)) or "none",
            f"{p.min_tokens_per_second:g}",
        )
    _console().print(table)


@profiles_group.command("show")
@click.argument("name")
@format_option
@dir_option
def show_cmd(name: str, fmt: str, directory: Path | None) -> None:
    """Show one profile and the sources of its figures."""
    from rich.table import Table

    from edgellm.profiles import get_profile

    p = get_profile(name, directory)
    if fmt == "json":
        echo_json(p.summary())
        return
    t = Table(title=p.display_name, show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    rows = [
        ("name", p.name),
        ("file", str(p.path)),
        ("class", p.device_class),
        ("arch", p.arch),
        ("RAM", f"{_gb(p.ram_bytes)} (model may use {p.model_share:g} = {_gb(p.usable_ram_bytes)})"),
        ("memory bandwidth", f"{p.bandwidth_gbps:g} GB/s sustained"),
        ("CPU", f"{p.cpu_model}, {p.cores} cores, up to {p.freq_ghz:g} GHz"),
        ("ISA", ", ".join(p.to_dict()["cpu"]["isa"]) or "-"),
        ("accelerators", "; ".join(f"{a.kind}: {a.name} ({a.tops_int8:g} INT8 TOPS)" for a in p.accelerators) or "-"),
        ("runtimes", (", ".join(sorted(p.runtimes)) or "none (cannot run an LLM)") + f"; {p.threads} threads"),
        (
            "targets",
            f">= {p.min_tokens_per_second:g} tok/s, first token <= {p.max_first_token_ms} ms, "
            f"context {p.context_length}",
        ),
        ("power budget", f"{p.power_budget_w:g} W"),
        ("sources", "\n".join(p.sources)),
    ]
    for k, v in rows:
        t.add_row(k, v)
    _console().print(t)


@profiles_group.command("detect")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the profile to this file (its stem becomes the name unless --name is given).",
)
@click.option("--name", default=None, help="Profile name ([a-z0-9-]; default: the --out file stem or 'detected').")
@click.option(
    "--device-class",
    default=None,
    type=click.Choice(["sbc", "jetson", "mini-pc", "laptop", "server", "mcu"]),
    help="Override the guessed device class.",
)
@click.option(
    "--no-bandwidth", is_flag=True, help="Skip the ~0.5 s memory bandwidth measurement (writes a 1.0 GB/s placeholder)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["toml", "json"]),
    default="toml",
    show_default=True,
    help="What to print: the profile file (toml) or, for machines, the profile with derived figures (json).",
)
def detect_cmd(out: Path | None, name: str | None, device_class: str | None, no_bandwidth: bool, fmt: str) -> None:
    """Describe this machine (cores, RAM, ISA flags, runtimes, measured memory bandwidth) as a profile.

    Prints the profile, or writes it to --out (always TOML, the format profiles are read from).
    """
    from datetime import datetime, timezone

    from edgellm.errors import ProfileError
    from edgellm.hardware import detect

    if name is None:
        name = out.stem if out is not None else "detected"
    if out is not None and out.stem != name:
        raise ProfileError(
            f"--out {out}: the file stem must equal the profile name {name!r}",
            hint=f"use --out {out.with_name(name + '.toml')} or drop --name",
        )
    prof = detect(measure_bandwidth=not no_bandwidth, name=name, device_class=device_class)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    bw = (
        "memory.bandwidth_gbps is a PLACEHOLDER (run without --no-bandwidth to measure it)"
        if no_bandwidth
        else "memory.bandwidth_gbps: one thread reading a 256 MiB buffer, median pass"
    )
    header = (
        f"Written by `edgellm profiles detect` on {stamp}.\n{bw}.\n"
        "model_share, targets and power.budget_w are defaults: edit them for your device."
    )
    if out is not None:
        atomic_write(out, prof.to_toml(header=header).encode("utf-8"))
    if fmt == "json":
        summary = prof.summary()
        if out is not None:
            summary["derived"]["path"] = str(out)
        echo_json(summary)
    elif out is None:
        click.echo(prof.to_toml(header=header), nl=False)
    else:
        click.echo(f"wrote {out}")


commands = [profiles_group]

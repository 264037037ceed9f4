"""`edgellm repo` — a signed TUF repository of bundles."""

from __future__ import annotations

import click

from edgellm.cli._common import echo_json, format_option


@click.group("repo")
def repo_group() -> None:
    """Publish bundles in a signed (TUF) repository."""


@repo_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--keys",
    "keys_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Directory made by `edgellm keys init`.",
)
@click.option("--targets-expiry", default=None, help="Override the keys' targets expiry (e.g. 90d).")
@click.option("--snapshot-expiry", default=None)
@click.option("--timestamp-expiry", default=None)
@click.option(
    "--root",
    "root",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="The root.json to trust (default KEYS/root.json), e.g. one signed on an offline machine.",
)
def repo_init(
    directory: str,
    keys_dir: str,
    targets_expiry: str | None,
    snapshot_expiry: str | None,
    timestamp_expiry: str | None,
    root: str | None,
) -> None:
    """Create an empty signed repository in DIRECTORY.

    KEYS needs the targets, snapshot and timestamp keys only; the root keys may stay offline
    (`edgellm keys copy-online`)."""
    import dataclasses

    from edgellm.trust import ExpiryPolicy, KeyStore, Repository, parse_duration

    expiry = ExpiryPolicy.from_dict(KeyStore(keys_dir).index.get("expiry", {}))
    over = {
        k: parse_duration(v)
        for k, v in {"targets": targets_expiry, "snapshot": snapshot_expiry, "timestamp": timestamp_expiry}.items()
        if v
    }
    Repository.create(directory, keys_dir, expiry=dataclasses.replace(expiry, **over), root=root)
    click.echo(f"created repository {directory} (serve {directory}/metadata and {directory}/targets as static files)")


@repo_group.command("add")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--keys", "keys_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--export",
    "export_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Also write a signed bundle (installable offline) per bundle into this directory.",
)
def repo_add(directory: str, bundles: tuple[str, ...], keys_dir: str, export_dir: str | None) -> None:
    """Publish BUNDLES as targets (custom metadata carries the model facts), re-signing metadata.

    All or nothing: the repository changes only if every bundle (and signed bundle) was written."""
    from pathlib import Path

    from edgellm.trust import Repository

    repo = Repository(directory, keys_dir)
    lines = []
    with repo.transaction():
        names = [repo.add_bundle(b) for b in bundles]
        for name in names:  # every signed bundle carries the final metadata: installable in any order
            lines.append(f"published {name}")
            if export_dir:
                lines.append(f"  signed bundle: {repo.export_signed(name, Path(export_dir) / f'{name}.signed')}")
    click.echo("\n".join(lines))


@repo_group.command("export")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("target")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def repo_export(directory: str, target: str, out: str) -> None:
    """Write TARGET with the metadata that verifies it, for offline install (`edgellm-agent install`)."""
    from edgellm.trust import Repository

    click.echo(str(Repository(directory).export_signed(target, out)))


@repo_group.command("list")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@format_option
def repo_list(directory: str, fmt: str) -> None:
    """List published targets and their model facts."""
    from rich.console import Console
    from rich.table import Table

    from edgellm.trust import Repository

    targets = Repository(directory).list_targets()
    if fmt == "json":
        echo_json([t.to_dict() for t in targets])
        return
    table = Table("target", "model", "version", "runtime", "quant", "profiles", "bytes")
    for t in targets:
        e = t.custom.get("edgellm", {})
        table.add_row(
            t.name,
            str(e.get("name", "")),
            str(e.get("version", "")),
            str(e.get("runtime", "")),
            str(e.get("quantization", "")),
            ",".join(e.get("profiles", [])),
            str(t.length),
        )
    Console().print(table)


@repo_group.command("remove")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("target")
@click.option("--keys", "keys_dir", required=True, type=click.Path(exists=True, file_okay=False))
def repo_remove(directory: str, target: str, keys_dir: str) -> None:
    """Withdraw TARGET from the signed targets metadata."""
    from edgellm.trust import Repository

    Repository(directory, keys_dir).remove_target(target)
    click.echo(f"removed {target}")


@repo_group.command("refresh")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--keys", "keys_dir", required=True, type=click.Path(exists=True, file_okay=False))
def repo_refresh(directory: str, keys_dir: str) -> None:
    """Re-sign the timestamp (run it well within the timestamp's expiry, e.g. from cron)."""
    from edgellm.trust import Repository

    v = Repository(directory, keys_dir).refresh_timestamp()
    click.echo(f"timestamp version {v}")


@repo_group.command("rotate-key")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--keys", "keys_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--role", required=True, type=click.Choice(["root", "targets", "snapshot", "timestamp"]))
def repo_rotate_key(directory: str, keys_dir: str, role: str) -> None:
    """Replace ROLE's keys; a new root version (signed by old and new root keys) tells devices."""
    from edgellm.trust import Repository

    keyid = Repository(directory, keys_dir).rotate_key(role)
    click.echo(f"rotated {role}: new key {keyid[:16]}; old key moved to {keys_dir}/retired/")


commands = [repo_group]

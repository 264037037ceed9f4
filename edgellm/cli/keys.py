"""`edgellm keys` — signing keys for a fleet's TUF repository."""

from __future__ import annotations

import click

from edgellm.cli._common import echo_json, format_option

ROLE_NAMES = ("root", "targets", "snapshot", "timestamp")


def _role_ints(values: tuple[str, ...], what: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        role, sep, n = v.partition("=")
        if not sep or role not in ROLE_NAMES or not n.isdigit():
            raise click.BadParameter(f"{v!r}: write ROLE=N with ROLE one of {', '.join(ROLE_NAMES)}", param_hint=what)
        out[role] = int(n)
    return out


@click.group("keys")
def keys_group() -> None:
    """Create and inspect signing keys."""


@keys_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--threshold",
    "thresholds",
    multiple=True,
    metavar="ROLE=N",
    help="Signatures required for a role (default 1). Repeatable.",
)
@click.option(
    "--count",
    "counts",
    multiple=True,
    metavar="ROLE=N",
    help="Keys to create for a role (default: its threshold). Repeatable.",
)
@click.option("--root-expiry", default="365d", show_default=True, help="Validity of root metadata.")
@click.option("--targets-expiry", default="90d", show_default=True)
@click.option("--snapshot-expiry", default="30d", show_default=True)
@click.option("--timestamp-expiry", default="7d", show_default=True)
@format_option
def keys_init(
    directory: str,
    thresholds: tuple[str, ...],
    counts: tuple[str, ...],
    root_expiry: str,
    targets_expiry: str,
    snapshot_expiry: str,
    timestamp_expiry: str,
    fmt: str,
) -> None:
    """Create Ed25519 keys for root, targets, snapshot and timestamp in DIRECTORY.

    Writes DIRECTORY/root.json: the trust root every device pins at provisioning.
    Private keys are written 0600; keep the root keys offline once the repository exists.
    """
    from edgellm.trust import ExpiryPolicy, KeyStore, init_keys, parse_duration

    expiry = ExpiryPolicy(
        parse_duration(root_expiry),
        parse_duration(targets_expiry),
        parse_duration(snapshot_expiry),
        parse_duration(timestamp_expiry),
    )
    root = init_keys(
        directory, thresholds=_role_ints(thresholds, "--threshold"), counts=_role_ints(counts, "--count"), expiry=expiry
    )
    index = KeyStore(directory).index
    if fmt == "json":
        echo_json({"root": str(root), "roles": index["roles"]})
        return
    click.echo(f"created keys in {directory}")
    for role, entries in index["roles"].items():
        click.echo(f"  {role:<9} {len(entries)} key(s): " + ", ".join(e["keyid"][:12] for e in entries))
    click.echo(f"trust root for devices: {root}")


@keys_group.command("copy-online")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
def keys_copy_online(directory: str, dest: str) -> None:
    """Copy DIRECTORY's keys to DEST without the root's private keys: what a server may hold.

    DEST gets root.json, keys.json and the targets, snapshot and timestamp keys. Keep DIRECTORY
    (the root keys) offline; rotating a key or re-signing the root is done where they are.
    """
    from edgellm.trust import copy_online_keys

    copy_online_keys(directory, dest)
    click.echo(f"copied the online keys to {dest} (no root private key); keep {directory} offline")


commands = [keys_group]

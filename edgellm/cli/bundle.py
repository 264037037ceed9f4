"""`edgellm bundle` — pack, inspect and verify bundles."""

from __future__ import annotations

import click

from edgellm.cli._common import echo_json, format_option


@click.group("bundle")
def bundle_group() -> None:
    """Pack, inspect and verify model bundles."""


@bundle_group.command("pack")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Archive to write.")
@format_option
def bundle_pack(directory: str, out: str, fmt: str) -> None:
    """Pack DIRECTORY (manifest.json + files) into a deterministic archive."""
    from edgellm.bundle import pack

    r = pack(directory, out)
    if fmt == "json":
        echo_json({"path": str(r.path), "sha256": r.sha256, "size": r.size})
    else:
        click.echo(f"{r.path}  {r.size} bytes  sha256 {r.sha256}")


@bundle_group.command("inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@format_option
def bundle_inspect(file: str, fmt: str) -> None:
    """Show a bundle's manifest, files and archive hash (nothing is extracted)."""
    from rich.console import Console
    from rich.table import Table

    from edgellm.bundle import describe

    d = describe(file)
    if fmt == "json":
        echo_json(d)
        return
    m = d["manifest"]
    c = Console()
    c.print(f"[bold]{m['name']}[/] {m['version']}  runtime={m['runtime']} quantization={m['quantization']}")
    c.print(f"profiles: {', '.join(m['profiles']) or '-'}   archive: {d['size']} bytes, sha256 {d['sha256']}")
    if m.get("metrics"):
        c.print("metrics: " + ", ".join(f"{k}={v}" for k, v in sorted(m["metrics"].items())))
    lin = m.get("lineage", {})
    c.print(f"lineage: parent={lin.get('parent_version')} data={str(lin.get('data_sha256'))[:12]}")
    t = Table("file", "bytes", "sha256")
    for f in m["files"]:
        t.add_row(f["path"], str(f["size"]), f["sha256"][:16] + "…")
    c.print(t)
    c.print(f"golden prompts: {len(m.get('golden_prompts', []))}")


@bundle_group.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--root", "root", required=True, type=click.Path(exists=True, dir_okay=False), help="The pinned root.json."
)
@click.option("--repo", default=None, help="Repository directory or URL. Omit for a signed bundle (offline).")
@click.option("--target", default=None, help="Target name (default: the file's name).")
@format_option
def bundle_verify(file: str, root: str, repo: str | None, target: str | None, fmt: str) -> None:
    """Verify FILE as a device would (python-tuf ngclient); exit 1 with the reason if refused."""
    import tempfile

    from edgellm.trust import is_signed_bundle, verify_bundle_file, verify_signed_bundle

    if repo is None:
        if not is_signed_bundle(file):
            raise click.ClickException(
                f"{file} carries no signed metadata: pass --repo DIR|URL, or export a signed bundle with `edgellm repo export`"
            )
        with tempfile.TemporaryDirectory() as tmp:
            vt = verify_signed_bundle(file, root, f"{tmp}/cache", f"{tmp}/out")
    else:
        vt = verify_bundle_file(file, root, repo, target=target)
    facts = vt.edgellm
    if fmt == "json":
        echo_json({"verified": True, "target": vt.name, "sha256": vt.sha256, "length": vt.length, "edgellm": facts})
    else:
        click.echo(
            f"OK {vt.name}: {facts.get('name')} {facts.get('version')} ({facts.get('runtime')}, {facts.get('quantization')}), sha256 {vt.sha256[:16]}…"
        )


commands = [bundle_group]

"""`edgellm-agent`: provision, run, status, install, update, rollback.

Heavy imports (FastAPI, uvicorn, runtimes) happen inside the commands that need them, so the
install path (and its crash tests) start fast.
"""

from __future__ import annotations

import json
import logging
import sys

import click

from agent.cli_examples import EXAMPLES
from edgellm._click import FriendlyGroup, add_examples, format_option


def _paths(data_dir: str | None):
    from agent.config import AgentPaths, default_data_dir

    return AgentPaths(data_dir or default_data_dir())


data_dir_option = click.option(
    "--data-dir",
    "data_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Agent data dir (default: $EDGELLM_AGENT_DIR or /var/lib/edgellm-agent).",
)


def _echo_result(res: dict, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(res, indent=2, sort_keys=True, default=str))
    else:
        verdict = "ok" if res.get("ok") else "FAILED"
        click.echo(
            f"{res.get('action')}: {verdict} version={res.get('version')}"
            + (f" ({res['reason']})" if res.get("reason") else "")
        )


@click.group(cls=FriendlyGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """edgellm-agent: verified A/B model updates and a local OpenAI-compatible API."""
    from agent.logs import configure

    configure(logging.WARNING - 10 * min(verbose, 2))


@main.command()
@data_dir_option
@click.option("--device-id", required=True)
@click.option("--profile", required=True, help="Hardware profile of this device.")
@click.option("--server", default=None, help="Control-plane URL (TUF repository at URL/metadata/, URL/targets/).")
@click.option(
    "--root",
    "root",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The fleet's TUF root.json to pin.",
)
@click.option("--group", default="default", show_default=True, help="Device group for rollouts.")
@click.option("--mqtt", "mqtt_url", default=None, help="Broker URL, e.g. mqtts://broker:8883.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--key", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--listen", default=None, help="Default HOST:PORT of the local API (loopback only).")
@click.option("--socket", "socket_path", default=None, help="Default Unix socket path of the local API.")
@click.option("--key-type", type=click.Choice(["ecdsa-p256", "ed25519"]), default="ecdsa-p256", show_default=True)
@click.option("--force", is_flag=True, help="Re-provision an already provisioned data dir.")
@click.option(
    "--train-data",
    "train_data",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Directory of local text (.txt, .jsonl with a 'text' field) this device may learn from "
    "in federated fine-tuning; the text never leaves the device.",
)
@click.option(
    "--learn-from-use",
    is_flag=True,
    help="Also learn from the user's own messages (capped in bytes; `edgellm-agent learn wipe` erases them).",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=None,
    help="Inference threads, overriding the bundle's per-profile setting (default: the bundle's, "
    "capped at the CPUs the agent may use).",
)
def provision(
    data_dir,
    device_id,
    profile,
    server,
    root,
    group,
    mqtt_url,
    ca,
    cert,
    key,
    listen,
    socket_path,
    key_type,
    force,
    train_data,
    learn_from_use,
    threads,
) -> None:
    """Pin the trust root, record the profile, create the API token and device keys."""
    from agent.provision import provision as _provision

    paths = _paths(data_dir)
    cfg = _provision(
        paths,
        device_id=device_id,
        profile=profile,
        server=server,
        root=root,
        group=group,
        mqtt_url=mqtt_url,
        ca=ca,
        cert=cert,
        key=key,
        listen=listen,
        socket_path=socket_path,
        key_type=key_type,
        force=force,
        train_data=train_data,
        learn_from_use=learn_from_use,
        threads=threads,
    )
    click.echo(f"provisioned {cfg.device_id} (profile {cfg.profile}) in {paths.root}")
    click.echo(f"  API token: {paths.token} (mode 0600)")
    click.echo(f"  admin token: {paths.admin_token} (mode 0600; admin API calls only)")
    click.echo(f"  device public key: {paths.keys / 'device.pub'}, CSR: {paths.keys / 'device.csr'}")


@main.command()
@data_dir_option
@click.option("--listen", default=None, help="HOST:PORT on loopback (default from config; '' to disable).")
@click.option("--socket", "socket_path", default=None, help="Unix socket path (mode 0660).")
def run(data_dir, listen, socket_path) -> None:
    """Serve the current model and keep it up to date (stops cleanly on SIGTERM/SIGINT)."""
    from agent.config import AgentConfig
    from agent.daemon import Daemon
    from agent.logs import configure

    configure(logging.INFO)
    paths = _paths(data_dir)
    cfg = AgentConfig.load(paths)
    sys.exit(Daemon(paths, cfg, listen=listen, socket_path=socket_path).run())


@main.command()
@data_dir_option
@format_option
def status(data_dir, fmt) -> None:
    """Current slot, version, model, health and the last update result."""
    from agent.config import AgentConfig
    from agent.daemon import status_dict

    paths = _paths(data_dir)
    st = status_dict(paths, AgentConfig.load(paths))
    if fmt == "json":
        click.echo(json.dumps(st, indent=2, sort_keys=True, default=str))
        return
    for k in ("device_id", "profile", "group", "slot", "model", "version", "runtime", "quantization", "health"):
        click.echo(f"{k:13} {st[k] if st[k] is not None else '-'}")
    hc = st.get("health_check") or {}
    if hc.get("tokens_per_second") is not None:
        click.echo(
            f"{'health check':13} {hc['tokens_per_second']:.1f} tok/s, "
            f"{(hc.get('memory_bytes') or 0) / 2**20:.1f} MiB, load {hc.get('load_s') or 0:.2f} s"
        )
    lu = st["last_update"]
    click.echo(
        f"{'last update':13} "
        + (
            f"{lu['action']} {'ok' if lu['ok'] else 'FAILED'} {lu.get('version') or ''}"
            f"{' — ' + lu['reason'] if lu.get('reason') else ''}"
            if lu
            else "-"
        )
    )
    tm = st["telemetry"]
    click.echo(f"{'telemetry':13} {tm['state']}" + (f" — {tm['error']}" if tm.get("error") else ""))
    d = st["daemon"]
    click.echo(
        f"{'daemon':13} "
        + (
            f"running (pid {d.get('pid')}, port {d.get('port')}, socket {d.get('socket')})"
            if d.get("running")
            else "not running"
        )
    )


@main.command()
@data_dir_option
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--allow-downgrade", is_flag=True, help="Allow installing an older version than the current one.")
@click.option("--force", is_flag=True, help="Reinstall the same version, or retry a rejected one.")
@format_option
def install(data_dir, files, allow_downgrade, force, fmt) -> None:
    """Install signed bundle files offline (same verification and A/B path as updates).

    Adapter bundles install on top of the base; given together, the base goes first."""
    from agent.config import AgentConfig
    from agent.install import Installer
    from agent.schemas import UpdateRequest

    paths = _paths(data_dir)
    results = Installer(paths, AgentConfig.load(paths)).install_envelopes(
        list(files), UpdateRequest(rollback=allow_downgrade, force=force)
    )
    if fmt == "json" and len(results) > 1:
        click.echo(json.dumps(results, indent=2, sort_keys=True, default=str))
        return
    for res in results:
        _echo_result(res, fmt)


@main.command()
@data_dir_option
@click.option(
    "--version",
    "version",
    default=None,
    help="Install this version now (default: the version the fleet assigned this device).",
)
@click.option("--model", default=None)
@click.option("--rollback", "allow_rollback", is_flag=True, help="Allow installing an older version.")
@click.option("--force", is_flag=True, help="Retry a version that was rejected before.")
@format_option
def update(data_dir, version, model, allow_rollback, force, fmt) -> None:
    """Check the server for this device's assignment now and install it."""
    from agent.config import AgentConfig
    from agent.install import Installer
    from agent.schemas import UpdateRequest
    from agent.source import tuf_source

    paths = _paths(data_dir)
    cfg = AgentConfig.load(paths)
    if not cfg.server:
        raise click.ClickException("this device has no --server configured; use `edgellm-agent install FILE`")
    source = tuf_source(paths, cfg)
    installer = Installer(paths, cfg)
    if version is None and model is None:  # what the fleet assigned this device: base, then adapters
        from agent import assignment

        res = assignment.apply(paths, cfg, source, installer, force=force)
        if res is None:
            res = {
                "action": "update",
                "ok": True,
                "version": None,
                "reason": "no version is assigned to this device or its group",
            }
    else:
        request = UpdateRequest.parse({"version": version, "model": model, "rollback": allow_rollback, "force": force})
        res = installer.update(source, request)
    _echo_result(res, fmt)
    for a in res.get("adapters", []) if fmt != "json" else []:
        _echo_result({**a, "action": f"adapter {a.get('adapter')}"}, fmt)


@main.command()
@data_dir_option
@click.option("--adapter", default=None, help="Drop this LoRA adapter instead (the base keeps serving).")
@format_option
def rollback(data_dir, adapter, fmt) -> None:
    """Switch back to the previous slot (a running daemon picks it up within a second)."""
    from agent.config import AgentConfig
    from agent.install import Installer

    paths = _paths(data_dir)
    res = Installer(paths, AgentConfig.load(paths)).rollback(adapter)
    _echo_result(res, fmt)


@main.group()
def learn() -> None:
    """What --learn-from-use kept of the user's messages (never leaves the device)."""


@learn.command("status")
@data_dir_option
@format_option
def learn_status(data_dir, fmt) -> None:
    """Whether learning from use is on, and how much text is kept."""
    from agent.config import AgentConfig
    from agent.federated.learn import status as _status

    paths = _paths(data_dir)
    st = _status(paths, AgentConfig.load(paths))
    text = (
        f"learn from use: {'on' if st['enabled'] else 'off'}; {st['messages']} messages, "
        f"{st['bytes']} of {st['max_bytes']} bytes in {st['path']}"
    )
    click.echo(json.dumps(st, indent=2, sort_keys=True) if fmt == "json" else text)


@learn.command("wipe")
@data_dir_option
def learn_wipe(data_dir) -> None:
    """Erase every kept message now."""
    from agent.config import AgentConfig
    from agent.federated.learn import wipe as _wipe

    paths = _paths(data_dir)
    AgentConfig.load(paths)  # refuses a data dir that is not an agent's
    click.echo(f"wiped {_wipe(paths)} bytes of kept messages")


add_examples(main, EXAMPLES)

if __name__ == "__main__":
    main()

"""The ``edgellm-server`` command: init, run, publish, devices, device, rollout, token, audit, ca.

Every command but ``init`` and ``run`` works on this machine's data directory
(``--data-dir``) or against a running server (``--server URL --token T``): see
:mod:`server.client`."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import click

from edgellm._click import FriendlyGroup, add_examples, format_option, setup_logging
from server.auth import ROLES
from server.cli_examples import EXAMPLES
from server.client import DATA_DIR_ENV, DB_ENV, Target, target_options

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=DATA_DIR_ENV,
    required=True,
    help=f"Server data directory (or ${DATA_DIR_ENV}).",
)


@click.group(cls=FriendlyGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """edgellm-server: TUF repository hosting, telemetry ingest, canary rollouts, fleet dashboard."""
    setup_logging(verbose)


@main.command()
@data_dir_option
@click.option(
    "--keys",
    "keys_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Adopt this keys directory (from `edgellm keys init`); only its online keys are copied.",
)
@click.option(
    "--repo",
    "repo_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Adopt this repository (from `edgellm repo init`, signed by --keys).",
)
@click.option(
    "--root-keys-out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Without --keys: where the new keys directory (root key included) goes "
    "[default: DATA_DIR-root-keys, next to DATA_DIR]. Move it off the server.",
)
def init(data_dir: Path, keys_dir: Path | None, repo_dir: Path | None, root_keys_out: Path | None) -> None:
    """Create DATA_DIR: the online TUF keys, a signed repository and the store. The root key
    never goes into DATA_DIR."""
    from server.app import DataDir, default_root_keys_dir

    if keys_dir is not None and root_keys_out is not None:
        raise click.UsageError("--root-keys-out is for new keys; with --keys the root key stays where it is")
    d = DataDir.init(data_dir, keys=keys_dir, repo=repo_dir, root_keys_out=root_keys_out)
    click.echo(f"initialised {d.root}\n  trust root for devices: {d.keys / 'root.json'}\n  repository: {d.repo}")
    operator_keys = keys_dir or root_keys_out or default_root_keys_dir(data_dir)
    click.echo(
        f"  root key: kept in {operator_keys}, not copied; "
        f"{'keep it there' if keys_dir else 'move that directory to an offline place'} "
        "(it signs key rotations only)"
    )


@main.command()
@data_dir_option
@click.option("--mqtt", "mqtt_url", required=True, help="Broker URL, e.g. mqtt://127.0.0.1:1883 or mqtts://host:8883.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), help="CA certificate of the broker (TLS).")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="Client certificate (TLS).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="Client key (TLS).")
@click.option("--http", "http_addr", default="127.0.0.1:8080", show_default=True, help="HOST:PORT for HTTP.")
@click.option(
    "--client-id",
    default="edgellm-server-1",
    show_default=True,
    help="MQTT client id; give each server replica its own (they share ingest).",
)
@click.option("--tick", default=1.0, show_default=True, help="Rollout driver period in seconds.")
@click.option("--min-samples", default=20, show_default=True, help="Inferences needed before a gate is judged.")
@click.option(
    "--max-bake-factor",
    default=3.0,
    show_default=True,
    help="A canary short of --min-samples keeps baking up to this many bake periods, then rolls back.",
)
@click.option(
    "--drive-rollouts/--no-drive-rollouts",
    default=True,
    show_default=True,
    help="Take part in the leader election for driving rollouts (replicas choose one through the database).",
)
@click.option(
    "--db",
    default=None,
    envvar=DB_ENV,
    metavar="URL",
    help=f"postgresql://USER@HOST/DB for replicas sharing one database [default: DATA_DIR/store.sqlite] (or ${DB_ENV}).",
)
@click.option(
    "--leader-ttl",
    default=10.0,
    show_default=True,
    help="Seconds a replica's leadership lasts without renewal (a takeover after a crash takes this long).",
)
@click.option(
    "--fl",
    "fl_addr",
    default=None,
    metavar="HOST:PORT",
    help="Start and supervise Flower's SuperLink here (its Fleet API at HOST:PORT) and drive `fl` runs.",
)
@click.option(
    "--fl-advertise",
    "fl_advertise",
    default=None,
    metavar="HOST:PORT",
    help="The SuperLink address devices are told, when a proxy or NAT sits in front (default: --fl).",
)
def run(
    data_dir: Path,
    mqtt_url: str,
    ca: str | None,
    cert: str | None,
    key: str | None,
    http_addr: str,
    client_id: str,
    tick: float,
    min_samples: int,
    max_bake_factor: float,
    drive_rollouts: bool,
    db: str | None,
    leader_ttl: float,
    fl_addr: str | None,
    fl_advertise: str | None,
) -> None:
    """Serve the repository, dashboard and API; ingest telemetry; drive rollouts."""
    from edgellm.telemetry import MqttConfig
    from server.app import Server

    host, _, port = http_addr.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter("use HOST:PORT, e.g. 127.0.0.1:8080", param_hint="--http")
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    srv = Server(
        data_dir,
        MqttConfig(mqtt_url, ca, cert, key),
        http_host=host,
        http_port=int(port),
        client_id=client_id,
        tick_s=tick,
        min_samples=min_samples,
        max_bake_factor=max_bake_factor,
        drive_rollouts=drive_rollouts,
        db=db,
        leader_ttl_s=leader_ttl,
        fl=fl_addr,
        fl_advertise=fl_advertise,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    srv.start()
    click.echo(f"edgellm-server: http {srv.url}  mqtt {mqtt_url}", err=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        srv.stop()


@main.command()
@target_options
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@format_option
def publish(target: Target, bundles: tuple[Path, ...], fmt: str) -> None:
    """Sign and publish BUNDLE archives (plain or signed bundles) into the server's TUF repository."""
    out = [target.publish(b) for b in bundles]
    if fmt == "json":
        click.echo(json.dumps(out, indent=2))
    else:
        for o in out:
            click.echo(
                f"published {o['target']}  ({o['model']} {o['version']}, {o['runtime']}, {', '.join(o['profiles'])})"
            )


@main.group("device")
def device_group() -> None:
    """One device: send it a command, read its replies."""


@device_group.command("command")
@target_options
@click.argument("device_id")
@click.argument("name")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Command argument (repeatable).")
@click.option("--wait", default=0.0, show_default=True, help="Seconds to wait for the device's reply.")
@format_option
def device_command(target: Target, device_id: str, name: str, args: tuple[str, ...], wait: float, fmt: str) -> None:
    """Send command NAME (ping, state, update, rollback) to DEVICE_ID through the running server."""
    kv = dict(a.partition("=")[::2] for a in args)
    sent = target.device_command(device_id, name, kv)
    reply = None
    deadline = time.monotonic() + wait
    while wait and reply is None and time.monotonic() < deadline:
        reply = next((r for r in target.device_replies(device_id) if r.get("id") == sent["id"]), None)
        if reply is None:
            time.sleep(0.5)
    out = {**sent, "reply": reply}
    click.echo(
        json.dumps(out, indent=2, default=str)
        if fmt == "json"
        else f"command {sent['id']} sent to {device_id}" + (f"; reply: {json.dumps(reply)}" if reply else "")
    )


# --------------------------------------------------------------------------- rollouts


@main.group("rollout")
def rollout_group() -> None:
    """Canary rollouts: start, status, pause, resume, abort, rollback."""


@rollout_group.command("start")
@target_options
@click.option("--model", required=True)
@click.option("--version", "version", required=True)
@click.option("--group", default="default", show_default=True)
@click.option(
    "--canary",
    default="10%",
    show_default=True,
    help="Share of the group that goes first, drawn from online devices not on the version.",
)
@click.option("--stages", default=None, help="Later stages, each with its own bake, e.g. 10%,50%,100%.")
@click.option("--gate", default="", help="e.g. 'p95_latency_ms<=800,error_rate<=0.01,mean_logprob>=-2.5'")
@click.option("--no-gate", is_flag=True, help="Promote on bake time alone (a rollout needs --gate or this).")
@click.option(
    "--min-samples",
    type=int,
    default=None,
    help="Inferences a gate needs before it is judged (default: the server's --min-samples).",
)
@click.option("--bake", default="10m", show_default=True, help="How long each stage is watched (30s, 10m, 2h).")
@click.option(
    "--device-timeout",
    default="15m",
    show_default=True,
    help="A device that does not reach the version within this is reported (canary: rolls back).",
)
@click.option(
    "--adapter",
    default=None,
    metavar="NAME[@VERSION]",
    help="The LoRA adapter bundle to ship to devices running exactly its base artifact (default: the one "
    "published at VERSION on MODEL, e.g. a federated run's); the others get the full bundle.",
)
@click.option(
    "--prefer",
    type=click.Choice(["adapter", "full"]),
    default="adapter",
    show_default=True,
    help="full: ship the full bundle to every device, even where an adapter would do.",
)
@click.option("--force", is_flag=True, help="Start even if the repository has no target for MODEL VERSION.")
@format_option
def rollout_start(
    target: Target,
    model: str,
    version: str,
    group: str,
    canary: str,
    stages: str | None,
    gate: str,
    no_gate: bool,
    min_samples: int | None,
    bake: str,
    device_timeout: str,
    adapter: str | None,
    prefer: str,
    force: bool,
    fmt: str,
) -> None:
    """Start a rollout: it assigns MODEL VERSION stage by stage; a running `edgellm-server run` carries it out."""
    rid = target.rollout_start(
        model=model,
        version=version,
        group=group,
        canary=canary,
        gate=gate,
        no_gate=no_gate,
        stages=stages,
        min_samples=min_samples,
        bake=bake,
        device_timeout=device_timeout,
        adapter=adapter,
        prefer=prefer,
        force=force,
    )["id"]
    if fmt == "json":
        click.echo(json.dumps({"id": rid}))
    else:
        click.echo(f"rollout {rid} created: {model} {version} -> group {group} (canary {canary}, bake {bake})")


@rollout_group.command("status")
@target_options
@click.argument("rollout_id", required=False)
@format_option
def rollout_status(target: Target, rollout_id: str | None, fmt: str) -> None:
    """Show rollouts (or one), with progress, reason and history."""
    rows = target.rollout_status(rollout_id)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no rollouts")
    from server.cli_fleet import echo_rollout

    for r in rows:
        echo_rollout(r, detail=rollout_id is not None)


def _action(name: str) -> click.Command:
    helps = {"rollback": "Roll a rollout back: re-assign what the group ran before (also after it completed)."}

    @click.command(name, help=helps.get(name, f"{name.capitalize()} a rollout."))
    @target_options
    @click.argument("rollout_id")
    def cmd(target: Target, rollout_id: str) -> None:
        target.rollout_action(rollout_id, name)
        click.echo(f"rollout {rollout_id}: {name} requested")

    return cmd


for _name in ("pause", "resume", "abort", "rollback"):
    rollout_group.add_command(_action(_name))


# --------------------------------------------------------------------------- API tokens, audit


@main.group("token")
def token_group() -> None:
    """API tokens: viewer (read), operator (rollouts, device commands, federated runs), admin (tokens, publishing)."""


@token_group.command("create")
@target_options
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--name", required=True, help="Who or what holds it, e.g. ci-deploy or alice.")
@format_option
def token_create(target: Target, role: str, name: str, fmt: str) -> None:
    """Make a token. It is printed once, as the last line: store it now."""
    t = target.token_create(name, role)
    if fmt == "json":
        click.echo(json.dumps(t, indent=2, default=str))
        return
    click.echo(f"token {t['id']} ({t['name']}, {t['role']}); shown once, store it now:")
    click.echo(t["token"])


@token_group.command("list")
@target_options
@format_option
def token_list(target: Target, fmt: str) -> None:
    """List tokens (never the tokens themselves)."""
    rows = target.token_list()
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for t in rows:
        state = "revoked" if t["revoked"] else "live"
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(t["last_used"])) if t["last_used"] else "never"
        click.echo(f"{t['id']}  {t['role']:<8} {state:<7} last used {used:<16}  {t['name']}")


@token_group.command("revoke")
@target_options
@click.argument("token_id")
def token_revoke(target: Target, token_id: str) -> None:
    """Revoke a token at once."""
    target.token_revoke(token_id)
    click.echo(f"token {token_id} revoked")


@main.command()
@target_options
@click.option("--limit", default=50, show_default=True)
@format_option
def audit(target: Target, limit: int, fmt: str) -> None:
    """The operator audit log: who did what through the API, when, and the result (newest first)."""
    rows = target.audit(max(1, min(limit, 10_000)))
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for a in rows:
        click.echo(
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(a['ts']))}  {a['who']:<16} "
            f"{a['action']:<40} {a['status']}  {a['result'][:80]}"
        )


# --------------------------------------------------------------------------- identity


@main.group("ca")
def ca_group() -> None:
    """Fleet CA: device and broker certificates for MQTT over TLS."""


@ca_group.command("init")
@target_options
def ca_init(target: Target) -> None:
    """Create the fleet CA in DATA_DIR/ca."""
    click.echo(f"fleet CA: {target.ca_init()['ca']}")


def _issued(paths: dict[str, str]) -> None:
    click.echo(f"cert: {paths['cert']}\nkey:  {paths['key']}\nca:   {paths['ca']}")


@ca_group.command("issue-device")
@target_options
@click.argument("device_id")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for DEVICE_ID.crt/.key (default DATA_DIR/ca/devices; with --server, here).",
)
def ca_issue_device(target: Target, device_id: str, out: Path | None) -> None:
    """Issue a client certificate for DEVICE_ID (its common name)."""
    _issued(target.ca_issue("device", out, name=device_id))


@ca_group.command("issue-server-client")
@target_options
@click.option(
    "--name",
    default="edgellm-server",
    show_default=True,
    help="edgellm-server, or edgellm-server-N for another replica.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for NAME.crt/.key (default DATA_DIR/ca/server-client; with --server, here).",
)
def ca_issue_server_client(target: Target, name: str, out: Path | None) -> None:
    """Issue the control plane's own MQTT client certificate (the broker's ACL gives it the
    server's rights; `ca issue-device` refuses these names)."""
    _issued(target.ca_issue("server-client", out, name=name))


@ca_group.command("issue-server")
@target_options
@click.option("--host", "hosts", multiple=True, required=True, help="Broker host name or IP (repeatable).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for server.crt/.key (default DATA_DIR/ca/broker; with --server, here).",
)
def ca_issue_server(target: Target, hosts: tuple[str, ...], out: Path | None) -> None:
    """Issue the broker's TLS server certificate."""
    _issued(target.ca_issue("server", out, hosts=list(hosts)))


@ca_group.command("mosquitto-conf")
@target_options
@click.option("--port", default=8883, show_default=True)
@click.option("--bind", default="0.0.0.0", show_default=True)
def ca_mosquitto_conf(target: Target, port: int, bind: str) -> None:
    """Print a Mosquitto configuration that requires fleet client certificates; writes the ACL
    (each device only on its own topics) to DATA_DIR/ca/mosquitto.acl. Issue the server's own
    client certificate with `ca issue-server-client`."""
    click.echo(target.ca_mosquitto_conf(port, bind), nl=False)


from server.cli_fleet import register as _register_fleet  # noqa: E402 - after the groups it extends
from server.federated.cli import register as _register_fl  # noqa: E402 - the fl group attaches to `main`, defined above

_register_fleet(main, device_group)

_register_fl(main, target_options)
add_examples(main, EXAMPLES)


if __name__ == "__main__":  # pragma: no cover
    main()

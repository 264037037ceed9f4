"""The ``edgellm-server`` command: init, run, publish, devices, rollout, ca."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import click

from edgellm._click import FriendlyGroup, format_option, setup_logging

DATA_DIR_ENV = "EDGELLM_SERVER_DATA"

data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar=DATA_DIR_ENV, required=True,
    help=f"Server data directory (or ${DATA_DIR_ENV}).",
)
@click.group(cls=FriendlyGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """edgellm-server: TUF repository hosting, telemetry ingest, canary rollouts, fleet dashboard."""
    setup_logging(verbose)


@main.command()
@data_dir_option
@click.option("--keys", "keys_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Adopt this keys directory (from `edgellm keys init`); only its online keys are copied.")
@click.option("--repo", "repo_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Adopt this repository (from `edgellm repo init`, signed by --keys).")
@click.option("--root-keys-out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Without --keys: where the new keys directory (root key included) goes "
                   "[default: DATA_DIR-root-keys, next to DATA_DIR]. Move it off the server.")
def init(data_dir: Path, keys_dir: Path | None, repo_dir: Path | None, root_keys_out: Path | None) -> None:
    """Create DATA_DIR: the online TUF keys, a signed repository and the store. The root key
    never goes into DATA_DIR."""
    from server.app import DataDir, default_root_keys_dir

    if keys_dir is not None and root_keys_out is not None:
        raise click.UsageError("--root-keys-out is for new keys; with --keys the root key stays where it is")
    d = DataDir.init(data_dir, keys=keys_dir, repo=repo_dir, root_keys_out=root_keys_out)
    click.echo(f"initialised {d.root}\n  trust root for devices: {d.keys / 'root.json'}\n  repository: {d.repo}")
    operator_keys = keys_dir or root_keys_out or default_root_keys_dir(data_dir)
    click.echo(f"  root key: kept in {operator_keys}, not copied; "
               f"{'keep it there' if keys_dir else 'move that directory to an offline place'} "
               "(it signs key rotations only)")


@main.command()
@data_dir_option
@click.option("--mqtt", "mqtt_url", required=True, help="Broker URL, e.g. mqtt://127.0.0.1:1883 or mqtts://host:8883.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), help="CA certificate of the broker (TLS).")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="Client certificate (TLS).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="Client key (TLS).")
@click.option("--http", "http_addr", default="127.0.0.1:8080", show_default=True, help="HOST:PORT for HTTP.")
@click.option("--client-id", default="edgellm-server-1", show_default=True,
              help="MQTT client id; give each server replica its own (they share ingest).")
@click.option("--tick", default=1.0, show_default=True, help="Rollout driver period in seconds.")
@click.option("--min-samples", default=20, show_default=True, help="Inferences needed before a gate is judged.")
@click.option("--max-bake-factor", default=3.0, show_default=True,
              help="A canary short of --min-samples keeps baking up to this many bake periods, then rolls back.")
@click.option("--drive-rollouts/--no-drive-rollouts", default=True, show_default=True,
              help="Run the rollout driver here (exactly one replica should).")
@click.option("--fl", "fl_addr", default=None, metavar="HOST:PORT",
              help="Start and supervise Flower's SuperLink here (its Fleet API at HOST:PORT) and drive `fl` runs.")
def run(data_dir: Path, mqtt_url: str, ca: str | None, cert: str | None, key: str | None, http_addr: str,
        client_id: str, tick: float, min_samples: int, max_bake_factor: float, drive_rollouts: bool,
        fl_addr: str | None) -> None:
    """Serve the repository, dashboard and API; ingest telemetry; drive rollouts."""
    from edgellm.telemetry import MqttConfig
    from server.app import Server

    host, _, port = http_addr.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter("use HOST:PORT, e.g. 127.0.0.1:8080", param_hint="--http")
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    srv = Server(data_dir, MqttConfig(mqtt_url, ca, cert, key), http_host=host, http_port=int(port),
                 client_id=client_id, tick_s=tick, min_samples=min_samples, max_bake_factor=max_bake_factor,
                 drive_rollouts=drive_rollouts, fl=fl_addr)
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
@data_dir_option
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@format_option
def publish(data_dir: Path, bundles: tuple[Path, ...], fmt: str) -> None:
    """Sign and publish BUNDLE archives (plain or signed bundles) into the server's TUF repository."""
    from edgellm.trust import Repository
    from server.app import DataDir

    d = DataDir(data_dir).check()
    repo = Repository(d.repo, d.keys)
    out = []
    for b in bundles:
        name = repo.add_bundle(b)
        facts = next(t.custom.get("edgellm", {}) for t in repo.list_targets() if t.name == name)
        out.append({"target": name, "model": facts.get("name"), "version": facts.get("version"),
                    "runtime": facts.get("runtime"), "profiles": facts.get("profiles", [])})
    if fmt == "json":
        click.echo(json.dumps(out, indent=2))
    else:
        for o in out:
            click.echo(f"published {o['target']}  ({o['model']} {o['version']}, {o['runtime']}, {', '.join(o['profiles'])})")


@main.command()
@data_dir_option
@click.option("--group", default=None, help="Only this device group.")
@format_option
def devices(data_dir: Path, group: str | None, fmt: str) -> None:
    """List devices: id, group, profile, version, online, last seen."""
    from server.app import DataDir

    rows = DataDir(data_dir).check().store().devices(group=group)
    if fmt == "json":
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("id", "group", "profile", "version", "online", "health", "last seen")
    for r in rows:
        seen = f"{time.time() - r.last_seen:.0f}s ago" if r.last_seen else "never"
        online = ("yes (silent)" if r.stale else "yes") if r.online else "no"
        t.add_row(r.id, r.group, r.profile or "", r.version or "", online, r.health or "", seen)
    Console().print(t)


# --------------------------------------------------------------------------- rollouts


@main.group("rollout")
def rollout_group() -> None:
    """Canary rollouts: start, status, pause, resume, abort."""


@rollout_group.command("start")
@data_dir_option
@click.option("--model", required=True)
@click.option("--version", "version", required=True)
@click.option("--group", default="default", show_default=True)
@click.option("--canary", default="10%", show_default=True, help="Share of the group that goes first.")
@click.option("--gate", default="", help="e.g. 'p95_latency_ms<=800,error_rate<=0.01,mean_logprob>=-2.5'")
@click.option("--bake", default="10m", show_default=True, help="How long the canary is watched (30s, 10m, 2h).")
@click.option("--force", is_flag=True, help="Start even if the repository has no target for MODEL VERSION.")
@format_option
def rollout_start(data_dir: Path, model: str, version: str, group: str, canary: str, gate: str, bake: str,
                  force: bool, fmt: str) -> None:
    """Start a rollout; a running `edgellm-server run` carries it out."""
    from edgellm.trust import Repository
    from server import rollout
    from server.app import DataDir

    d = DataDir(data_dir).check()
    if not force:
        published = {(t.custom.get("edgellm", {}).get("name"), t.custom.get("edgellm", {}).get("version"))
                     for t in Repository(d.repo).list_targets()}
        if (model, version) not in published:
            raise click.ClickException(
                f"the repository has no target for {model} {version}: devices could not install it\n"
                f"  hint: `edgellm-server publish --data-dir {data_dir} BUNDLE` first (or --force)")
    store = d.store()
    rid = rollout.start(store, model=model, version=version, group=group, canary=canary, gate=gate, bake=bake)
    if fmt == "json":
        click.echo(json.dumps({"id": rid}))
    else:
        click.echo(f"rollout {rid} created: {model} {version} -> group {group} (canary {canary}, bake {bake})")


@rollout_group.command("status")
@data_dir_option
@click.argument("rollout_id", required=False)
@format_option
def rollout_status(data_dir: Path, rollout_id: str | None, fmt: str) -> None:
    """Show rollouts (or one), with progress, reason and history."""
    from server import rollout
    from server.app import DataDir

    rows = rollout.status(DataDir(data_dir).check().store(), rollout_id)
    if fmt == "json":
        click.echo(rollout.to_json(rows))
        return
    if not rows:
        click.echo("no rollouts")
    for r in rows:
        paused = " (paused)" if r["paused"] else ""
        click.echo(f"{r['id']}  {r['model']} {r['version']} -> {r['group']}: {r['state']}{paused}  "
                   f"{r['on_new_version']}/{r['devices']} on new version, canary {r['canary_devices']}")
        if r["reason"]:
            click.echo(f"  reason: {r['reason']}")
        if rollout_id:
            for h in r["history"]:
                click.echo(f"  {time.strftime('%H:%M:%S', time.localtime(h['ts']))} {h['state']:<12} {h['message']}")


def _action(name: str) -> click.Command:
    @click.command(name, help=f"{name.capitalize()} a rollout.")
    @data_dir_option
    @click.argument("rollout_id")
    def cmd(data_dir: Path, rollout_id: str) -> None:
        from server import rollout
        from server.app import DataDir

        rollout.request(DataDir(data_dir).check().store(), rollout_id, name)
        click.echo(f"rollout {rollout_id}: {name} requested")

    return cmd


for _name in ("pause", "resume", "abort"):
    rollout_group.add_command(_action(_name))


# --------------------------------------------------------------------------- identity


@main.group("ca")
def ca_group() -> None:
    """Fleet CA: device and broker certificates for MQTT over TLS."""


@ca_group.command("init")
@data_dir_option
def ca_init(data_dir: Path) -> None:
    """Create the fleet CA in DATA_DIR/ca."""
    from server.app import DataDir
    from server.identity import CertificateAuthority

    ca = CertificateAuthority.init(DataDir(data_dir).ca)
    click.echo(f"fleet CA: {ca.cert_path}")


@ca_group.command("issue-device")
@data_dir_option
@click.argument("device_id")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for DEVICE_ID.crt/.key (default DATA_DIR/ca/devices).")
def ca_issue_device(data_dir: Path, device_id: str, out: Path | None) -> None:
    """Issue a client certificate for DEVICE_ID (its common name)."""
    from server.app import DataDir
    from server.identity import CertificateAuthority

    d = DataDir(data_dir)
    issued = CertificateAuthority(d.ca).issue_device(device_id, out or d.ca / "devices")
    click.echo(f"cert: {issued.cert}\nkey:  {issued.key}\nca:   {issued.ca}")


@ca_group.command("issue-server-client")
@data_dir_option
@click.option("--name", default="edgellm-server", show_default=True,
              help="edgellm-server, or edgellm-server-N for another replica.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for NAME.crt/.key (default DATA_DIR/ca/server-client).")
def ca_issue_server_client(data_dir: Path, name: str, out: Path | None) -> None:
    """Issue the control plane's own MQTT client certificate (the broker's ACL gives it the
    server's rights; `ca issue-device` refuses these names)."""
    from server.app import DataDir
    from server.identity import CertificateAuthority

    d = DataDir(data_dir)
    issued = CertificateAuthority(d.ca).issue_server_client(out or d.ca / "server-client", name)
    click.echo(f"cert: {issued.cert}\nkey:  {issued.key}\nca:   {issued.ca}")


@ca_group.command("issue-server")
@data_dir_option
@click.option("--host", "hosts", multiple=True, required=True, help="Broker host name or IP (repeatable).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None)
def ca_issue_server(data_dir: Path, hosts: tuple[str, ...], out: Path | None) -> None:
    """Issue the broker's TLS server certificate."""
    from server.app import DataDir
    from server.identity import CertificateAuthority

    d = DataDir(data_dir)
    issued = CertificateAuthority(d.ca).issue_server(out or d.ca / "broker", list(hosts))
    click.echo(f"cert: {issued.cert}\nkey:  {issued.key}\nca:   {issued.ca}")


@ca_group.command("mosquitto-conf")
@data_dir_option
@click.option("--port", default=8883, show_default=True)
@click.option("--bind", default="0.0.0.0", show_default=True)
def ca_mosquitto_conf(data_dir: Path, port: int, bind: str) -> None:
    """Print a Mosquitto configuration that requires fleet client certificates; writes the ACL
    (each device only on its own topics) to DATA_DIR/ca/mosquitto.acl. Issue the server's own
    client certificate with `ca issue-server-client`."""
    from edgellm._fs import atomic_write
    from server.app import DataDir
    from server.identity import mosquitto_acl, mosquitto_config

    d = DataDir(data_dir)
    broker = d.ca / "broker"
    if not (broker / "server.crt").is_file():
        raise click.ClickException("no broker certificate yet\n  hint: run `edgellm-server ca issue-server --host NAME` first")
    acl = d.ca / "mosquitto.acl"
    atomic_write(acl, mosquitto_acl().encode(), mode=0o644)
    click.echo(mosquitto_config(port=port, bind=bind, ca=d.ca / "ca.crt", cert=broker / "server.crt",
                                key=broker / "server.key", persistence_dir=d.root / "mosquitto", acl_file=acl), nl=False)


from server.federated.cli import register as _register_fl  # noqa: E402

_register_fl(main, data_dir_option)


if __name__ == "__main__":  # pragma: no cover
    main()

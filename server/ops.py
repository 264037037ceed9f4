"""What an operator can do, in one place: the ``edgellm-server`` CLI calls these directly with
``--data-dir``, and the API (:mod:`server.api`) calls the same functions for remote callers.
Every function takes and returns JSON-shaped values."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgellm import telemetry as wire
from edgellm.ids import ID_RULE, valid_id
from server import auth, rollout
from server.errors import ConflictError, NotFoundError, RolloutError, ServerError
from server.store import Store

Publish = Callable[[str, bytes, bool], None]

#: how long one replica may hold the repository for a publish before another may take over
PUBLISH_LEASE_S = 600.0
#: bound of a device command's name and JSON arguments
COMMAND_NAME_MAX = 64


def devices(store: Store, group: str | None = None, director: Any = None) -> list[dict[str, Any]]:
    """Registry rows; with the ``director``, also desired vs running version, drift, rejected
    versions and the last update error (:func:`server.fleet.device_views`)."""
    from server.fleet import device_views

    return device_views(store, director, group=group)


def device_replies(store: Store, device: str) -> list[dict[str, Any]]:
    return store.message_bodies(_device_id(device), "reply")


def published(repo_dir: Path) -> list[dict[str, Any]]:
    from edgellm.trust import Repository

    out = []
    for t in Repository(repo_dir).list_targets():
        facts = t.custom.get("edgellm", {})
        out.append(
            {
                "target": t.name,
                "model": facts.get("name"),
                "version": facts.get("version"),
                "runtime": facts.get("runtime"),
                "profiles": facts.get("profiles", []),
            }
        )
    return out


@contextmanager
def repository_lock(store: Store) -> Iterator[None]:
    """Replicas share the repository directory: whoever writes it (a publish, the timestamp
    refresh) holds the ``publish`` lease in the store meanwhile."""
    holder = secrets.token_hex(8)
    if store.acquire_lease("publish", holder, PUBLISH_LEASE_S) is None:
        raise ConflictError("another publish is writing the repository", hint="try again in a moment")
    try:
        yield
    finally:
        store.release_lease("publish", holder)


def publish(repo_dir: Path, keys_dir: Path, store: Store, bundle: Path) -> dict[str, Any]:
    """Sign and publish one bundle archive."""
    from edgellm.trust import Repository

    with repository_lock(store):
        name = Repository(repo_dir, keys_dir).add_bundle(bundle)
    return next(p for p in published(repo_dir) if p["target"] == name)


def rollout_start(
    repo_dir: Path,
    store: Store,
    *,
    model: str,
    version: str,
    group: str = "default",
    canary: str = "10%",
    gate: str = "",
    bake: str = "10m",
    force: bool = False,
    no_gate: bool = False,
    stages: str | None = None,
    min_samples: int | None = None,
    device_timeout: str = rollout.DEFAULT_DEVICE_TIMEOUT,
    adapter: str | None = None,
    prefer: str = "adapter",
) -> dict[str, Any]:
    rollout.gate_of(gate, no_gate)  # a rollout without a gate is refused first, whatever else is wrong
    if not force and not any(p["model"] == model and p["version"] == version for p in published(repo_dir)):
        raise RolloutError(
            f"the repository has no target for {model} {version}: devices could not install it",
            hint="`edgellm-server publish BUNDLE` first (or force)",
        )
    if not force:  # the adapter it ships to devices on its base: published, and one name
        from edgellm.trust import Repository
        from server.release import Release, parse_adapter

        Release(Repository(repo_dir), model, version, adapter=parse_adapter(adapter, version), prefer=prefer)
    rid = rollout.start(
        store,
        model=model,
        version=version,
        group=group,
        canary=canary,
        gate=gate,
        bake=bake,
        no_gate=no_gate,
        stages=stages,
        min_samples=min_samples,
        device_timeout=device_timeout,
        adapter=adapter,
        prefer=prefer,
    )
    return {"id": rid}


def rollout_status(store: Store, rollout_id: str | None = None) -> list[dict[str, Any]]:
    return rollout.status(store, rollout_id)


def rollout_action(store: Store, rollout_id: str, action: str) -> dict[str, Any]:
    rollout.request(store, rollout_id, action)
    return {"id": rollout_id, "requested": action}


def device_command(
    store: Store, publish_fn: Publish | None, device: str, name: str, args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Send a command to a device over MQTT (the server's connection); the device answers with
    a ``reply`` message carrying the same id (see :func:`device_replies`)."""
    _device_id(device)
    if not isinstance(name, str) or not valid_id(name) or len(name) > COMMAND_NAME_MAX:
        raise ServerError(f"command name {name!r} is not valid", hint=f"use {ID_RULE}, e.g. ping, state, update")
    if args is not None and not isinstance(args, dict):
        raise ServerError("command args must be a JSON object", hint='e.g. {"version": "2"}')
    if store.device(device) is None:
        raise NotFoundError(f"no device {device!r}", hint="list devices with `edgellm-server devices`")
    if publish_fn is None:  # no broker connection here: the leader sends it (server.commands)
        from server import commands

        return {"id": commands.queue(store, device, name, dict(args or {})), "device": device, "name": name}
    cmd = wire.Command(id=secrets.token_hex(8), name=name, args=dict(args or {}))
    payload = wire.dumps(cmd.to_dict())
    if len(payload) > wire.MAX_PAYLOAD_BYTES:
        raise ServerError("command too large", hint=f"keep it under {wire.MAX_PAYLOAD_BYTES} bytes")
    publish_fn(wire.command_topic(device), payload, False)
    return {"id": cmd.id, "device": device, "name": name}


def token_create(store: Store, name: str, role: str) -> dict[str, Any]:
    row, token = auth.create_token(store, name=name, role=role)
    return {**row.to_dict(), "token": token}


def token_list(store: Store) -> list[dict[str, Any]]:
    return [t.to_dict() for t in store.tokens()]


def token_revoke(store: Store, token_id: str) -> dict[str, Any]:
    if not store.revoke_token(token_id):
        raise NotFoundError(f"no live token {token_id!r}", hint="list tokens with `edgellm-server token list`")
    return {"id": token_id, "revoked": True}


def _device_id(device: str) -> str:
    if not valid_id(device):
        raise ServerError(f"device id {device!r} is not valid", hint=f"use {ID_RULE}")
    return device


# --------------------------------------------------------------------------- fleet CA

CA_KINDS = ("device", "server-client", "server")


def ca_init(ca_dir: Path) -> dict[str, Any]:
    from server.identity import CertificateAuthority

    ca = CertificateAuthority.init(ca_dir)
    return {"ca": str(ca.cert_path), "ca_pem": ca.cert_path.read_text()}


def ca_issue(
    ca_dir: Path, kind: str, out_dir: Path, *, name: str | None = None, hosts: list[str] | None = None
) -> dict[str, str]:
    """Issue a device, control-plane client or broker certificate into ``out_dir``; returns the
    paths (``cert``, ``key``, ``ca``)."""
    from server.identity import SERVER_IDENTITY, CertificateAuthority

    ca = CertificateAuthority(ca_dir)
    if kind == "device":
        issued = ca.issue_device(name or "", out_dir)
    elif kind == "server-client":
        issued = ca.issue_server_client(out_dir, name or SERVER_IDENTITY)
    elif kind == "server":
        issued = ca.issue_server(out_dir, list(hosts or []))
    else:
        raise ServerError(f"unknown certificate kind {kind!r}", hint=f"use one of {', '.join(CA_KINDS)}")
    return {"cert": str(issued.cert), "key": str(issued.key), "ca": str(issued.ca)}


def ca_issue_pem(ca_dir: Path, kind: str, *, name: str | None = None, hosts: list[str] | None = None) -> dict[str, str]:
    """:func:`ca_issue` for a remote caller: the PEM texts, the private key not kept on the server."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="edgellm-issue-"))
    try:
        paths = ca_issue(ca_dir, kind, tmp, name=name, hosts=hosts)
        return {
            "stem": Path(paths["cert"]).stem,
            "cert_pem": Path(paths["cert"]).read_text(),
            "key_pem": Path(paths["key"]).read_text(),
            "ca_pem": Path(paths["ca"]).read_text(),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def mosquitto_conf(ca_dir: Path, persistence_dir: Path, port: int, bind: str) -> str:
    """A Mosquitto configuration requiring fleet client certificates; writes the ACL next to the CA."""
    from edgellm._fs import atomic_write
    from server.identity import mosquitto_acl, mosquitto_config

    broker = ca_dir / "broker"
    if not (broker / "server.crt").is_file():
        raise ServerError("no broker certificate yet", hint="run `edgellm-server ca issue-server --host NAME` first")
    acl = ca_dir / "mosquitto.acl"
    atomic_write(acl, mosquitto_acl().encode(), mode=0o644)
    return mosquitto_config(
        port=port,
        bind=bind,
        ca=ca_dir / "ca.crt",
        cert=broker / "server.crt",
        key=broker / "server.key",
        persistence_dir=persistence_dir,
        acl_file=acl,
    )


# --------------------------------------------------------------------------- federated runs


def fl_start(
    repo_dir: Path,
    store: Store,
    *,
    model: str,
    version: str,
    publish: str,
    group: str = "default",
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Record a federated run (the leader's federated driver carries it out). ``settings``: the
    fields of :class:`server.federated.store.RunSettings`; unknown ones are refused."""
    import dataclasses

    from server.federated.store import FlStore, RunSettings
    from server.gate import Gate, parse_percent

    given = dict(settings or {})
    known = {f.name for f in dataclasses.fields(RunSettings)}
    if set(given) - known:
        raise ServerError(
            f"unknown settings: {', '.join(sorted(set(given) - known))}",
            hint=f"settings may hold {', '.join(sorted(known))}",
        )
    try:
        s = RunSettings(**given)
    except TypeError as e:
        raise ServerError(f"bad settings: {e}", hint="see `edgellm-server fl start --help`") from None
    parse_percent(s.canary)
    Gate.parse(s.gate)
    rollout.parse_bake(s.bake)
    if not any(p["model"] == model and p["version"] == version for p in published(repo_dir)):
        raise ServerError(
            f"the repository has no bundle of {model} {version} for devices to fine-tune",
            hint="`edgellm-server publish BUNDLE` first",
        )
    rid = FlStore(store).create(model=model, base_version=version, version=publish, group=group, settings=s.check())
    return {"id": rid, "state": "pending"}


def fl_status(store: Store, run_id: str | None = None) -> list[dict[str, Any]]:
    from server.federated.store import FlStore, status

    return status(FlStore(store), run_id)

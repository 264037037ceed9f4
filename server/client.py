"""Where an ``edgellm-server`` command acts: a data directory on this machine (``--data-dir``,
:class:`LocalTarget`, the functions of :mod:`server.ops` called directly) or a running server
(``--server URL --token T``, :class:`RemoteTarget`, the same functions behind ``/api/v1``).
Both return the same JSON-shaped values, so each command prints them one way."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from server import ops
from server.errors import ServerError

DATA_DIR_ENV = "EDGELLM_SERVER_DATA"
DB_ENV = "EDGELLM_SERVER_DB"
URL_ENV = "EDGELLM_SERVER_URL"
TOKEN_ENV = "EDGELLM_SERVER_TOKEN"


def _audited(action: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A change made on the server host goes into the audit log too (who: the local user)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(self: LocalTarget, *args: Any, **kw: Any) -> Any:
            import getpass

            target = " ".join([*(str(a) for a in args), *(f"{k}={v}" for k, v in kw.items())])[:200] or "-"
            who = f"local:{getpass.getuser()}"
            try:
                out = fn(self, *args, **kw)
            except Exception as e:
                self.store.audit(
                    token=None,
                    who=who,
                    role=None,
                    action=action,
                    target=target,
                    status=400,
                    result=getattr(e, "message", None) or (str(e.args[0]) if e.args else type(e).__name__),
                )
                raise
            result = {k: v for k, v in out.items() if k != "token"} if isinstance(out, dict) else "ok"
            self.store.audit(
                token=None, who=who, role=None, action=action, target=target, status=200, result=str(result)[:1000]
            )
            return out

        return wrapper

    return deco


class LocalTarget:
    def __init__(self, data_dir: Path, db: str | None = None) -> None:
        from server.app import DataDir

        self.data = DataDir(data_dir).check()
        self.store = self.data.store(db)
        self.where = f"--data-dir {data_dir}"

    def devices(self, group: str | None) -> list[dict[str, Any]]:
        return ops.devices(self.store, group, self.data.director(self.store))

    @_audited("cli device group")
    def device_group(self, device: str, group: str) -> dict[str, Any]:
        from server import ops_fleet

        return ops_fleet.device_group(self.data, self.store, device, group)

    @_audited("cli yank")
    def yank(self, model: str, version: str, reason: str | None) -> dict[str, Any]:
        from server import ops_fleet

        return ops_fleet.yank(self.data, self.store, model, version, reason)

    def device_command(self, device: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
        return ops.device_command(self.store, None, device, name, args)

    def device_replies(self, device: str) -> list[dict[str, Any]]:
        return ops.device_replies(self.store, device)

    @_audited("cli publish")
    def publish(self, bundle: Path) -> dict[str, Any]:
        return ops.publish(self.data.repo, self.data.keys, self.store, bundle)

    @_audited("cli rollout start")
    def rollout_start(self, **kw: Any) -> dict[str, Any]:
        return ops.rollout_start(self.data.repo, self.store, **kw)

    def rollout_status(self, rollout_id: str | None) -> list[dict[str, Any]]:
        return ops.rollout_status(self.store, rollout_id)

    @_audited("cli rollout action")
    def rollout_action(self, rollout_id: str, action: str) -> dict[str, Any]:
        return ops.rollout_action(self.store, rollout_id, action)

    @_audited("cli token create")
    def token_create(self, name: str, role: str) -> dict[str, Any]:
        return ops.token_create(self.store, name, role)

    def token_list(self) -> list[dict[str, Any]]:
        return ops.token_list(self.store)

    @_audited("cli token revoke")
    def token_revoke(self, token_id: str) -> dict[str, Any]:
        return ops.token_revoke(self.store, token_id)

    def audit(self, limit: int) -> list[dict[str, Any]]:
        return [a.to_dict() for a in self.store.audit_log(limit=limit)]

    @_audited("cli ca init")
    def ca_init(self) -> dict[str, Any]:
        return ops.ca_init(self.data.ca)

    @_audited("cli ca issue")
    def ca_issue(
        self, kind: str, out: Path | None, *, name: str | None = None, hosts: list[str] | None = None
    ) -> dict[str, str]:
        default = {"device": "devices", "server-client": "server-client", "server": "broker"}.get(kind, "x")
        return ops.ca_issue(self.data.ca, kind, out or self.data.ca / default, name=name, hosts=hosts)

    def ca_mosquitto_conf(self, port: int, bind: str) -> str:
        return ops.mosquitto_conf(self.data.ca, self.data.root / "mosquitto", port, bind)

    @_audited("cli fl start")
    def fl_start(self, **kw: Any) -> dict[str, Any]:
        return ops.fl_start(self.data.repo, self.store, **kw)

    def fl_status(self, run_id: str | None) -> list[dict[str, Any]]:
        return ops.fl_status(self.store, run_id)


class RemoteError(ServerError):
    """The server refused a call; ``status`` is its HTTP status."""

    def __init__(self, message: str, *, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class RemoteTarget:
    def __init__(self, url: str, token: str | None, timeout: float = 60.0) -> None:
        import httpx

        if not url.startswith(("http://", "https://")):
            raise ServerError(
                f"--server {url!r} is not an http(s) URL", hint="e.g. --server https://fleet.example:8080"
            )
        self.where = f"--server {url}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/") + "/api/v1", headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ServerError(f"cannot reach the server: {e}", hint="check --server (or $EDGELLM_SERVER_URL)") from None
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code >= 400:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            raise RemoteError(
                f"{r.status_code}: {err.get('message') or r.text[:200]}", status=r.status_code, hint=err.get("hint")
            )
        return body

    def devices(self, group: str | None) -> list[dict[str, Any]]:
        return self._call("GET", "/devices", params={"group": group} if group else None)

    def device_command(self, device: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", f"/devices/{quote(device, safe='')}/commands", json={"name": name, "args": args})

    def device_replies(self, device: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/devices/{quote(device, safe='')}/replies")

    def device_group(self, device: str, group: str) -> dict[str, Any]:
        return self._call("POST", f"/devices/{quote(device, safe='')}/group", json={"group": group})

    def yank(self, model: str, version: str, reason: str | None) -> dict[str, Any]:
        return self._call("POST", "/yank", json={"model": model, "version": version, "reason": reason})

    def publish(self, bundle: Path) -> dict[str, Any]:
        with open(bundle, "rb") as fh:
            return self._call(
                "POST",
                "/publish",
                params={"filename": bundle.name},
                content=fh,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(bundle.stat().st_size)},
            )

    def rollout_start(self, **kw: Any) -> dict[str, Any]:
        return self._call("POST", "/rollouts", json=kw)

    def rollout_status(self, rollout_id: str | None) -> list[dict[str, Any]]:
        if rollout_id:
            return [self._call("GET", f"/rollouts/{quote(rollout_id, safe='')}")]
        return self._call("GET", "/rollouts")

    def rollout_action(self, rollout_id: str, action: str) -> dict[str, Any]:
        return self._call("POST", f"/rollouts/{quote(rollout_id, safe='')}/{action}")

    def token_create(self, name: str, role: str) -> dict[str, Any]:
        return self._call("POST", "/tokens", json={"name": name, "role": role})

    def token_list(self) -> list[dict[str, Any]]:
        return self._call("GET", "/tokens")

    def token_revoke(self, token_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/tokens/{quote(token_id, safe='')}")

    def audit(self, limit: int) -> list[dict[str, Any]]:
        return self._call("GET", "/audit", params={"limit": limit})

    def ca_init(self) -> dict[str, Any]:
        return self._call("POST", "/ca")

    def ca_issue(
        self, kind: str, out: Path | None, *, name: str | None = None, hosts: list[str] | None = None
    ) -> dict[str, str]:
        """The server issues; the certificate, key and CA land in ``out`` (default: here)."""
        from edgellm._fs import atomic_write

        got = self._call("POST", "/ca/certificates", json={"kind": kind, "name": name, "hosts": hosts or []})
        out = out or Path.cwd()
        out.mkdir(parents=True, exist_ok=True)
        stem = Path(str(got["stem"])).name  # never a path from the server
        paths = {"cert": out / f"{stem}.crt", "key": out / f"{stem}.key", "ca": out / "ca.crt"}
        atomic_write(paths["key"], got["key_pem"].encode(), mode=0o600)
        atomic_write(paths["cert"], got["cert_pem"].encode(), mode=0o644)
        atomic_write(paths["ca"], got["ca_pem"].encode(), mode=0o644)
        return {k: str(v) for k, v in paths.items()}

    def ca_mosquitto_conf(self, port: int, bind: str) -> str:
        return self._call("POST", "/ca/mosquitto-conf", json={"port": port, "bind": bind})["config"]

    def fl_start(self, **kw: Any) -> dict[str, Any]:
        """``kw``: model, version, group, publish, settings (the fields of ``fl start``)."""
        return self._call("POST", "/fl/runs", json=kw)

    def fl_status(self, run_id: str | None) -> list[dict[str, Any]]:
        if run_id:
            return [self._call("GET", f"/fl/runs/{quote(run_id, safe='')}")]
        return self._call("GET", "/fl/runs")


Target = LocalTarget | RemoteTarget


_TARGET_OPTIONS = (
    click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=f"Server data directory on this machine (or ${DATA_DIR_ENV}).",
    ),
    click.option(
        "--db", default=None, help=f"With --data-dir: the server's PostgreSQL URL, if it uses one (or ${DB_ENV})."
    ),
    click.option(
        "--server",
        "server_url",
        default=None,
        metavar="URL",
        help=f"A running server's URL, instead of --data-dir (or ${URL_ENV}).",
    ),
    click.option("--token", default=None, help=f"API token for --server (or ${TOKEN_ENV})."),
)


def target_options(fn: Any) -> Any:
    """``--data-dir`` (local) or ``--server``/``--token`` (remote); the command gets ``target``.
    Decorates a command function, or an existing :class:`click.Command`."""

    def resolving(callback: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(callback)
        def wrapper(
            *args: Any, data_dir: Path | None, db: str | None, server_url: str | None, token: str | None, **kw: Any
        ) -> Any:
            return callback(*args, target=resolve(data_dir, db, server_url, token), **kw)

        return wrapper

    if isinstance(fn, click.Command):
        fn.callback = resolving(fn.callback) if fn.callback is not None else None
        for opt in _TARGET_OPTIONS:
            opt(fn)  # on a Command, click appends the option to its params
        return fn
    fn = resolving(fn)
    for opt in reversed(_TARGET_OPTIONS):
        fn = opt(fn)
    return fn


def resolve(data_dir: Path | None, db: str | None, server_url: str | None, token: str | None) -> Target:
    """Flags first, then the environment; naming both a data directory and a server is refused."""
    if data_dir is not None and server_url is not None:
        raise click.UsageError("give --data-dir (this machine) or --server (a running server), not both")
    server_url = server_url or (None if data_dir is not None else os.environ.get(URL_ENV) or None)
    if server_url:
        return RemoteTarget(server_url, token or os.environ.get(TOKEN_ENV) or None)
    data_dir = data_dir or (Path(os.environ[DATA_DIR_ENV]) if os.environ.get(DATA_DIR_ENV) else None)
    if data_dir is None:
        raise click.UsageError(
            f"say where: --data-dir DIR on the server host, or --server URL --token T "
            f"(or ${DATA_DIR_ENV} / ${URL_ENV} and ${TOKEN_ENV})"
        )
    return LocalTarget(data_dir, db or os.environ.get(DB_ENV) or None)

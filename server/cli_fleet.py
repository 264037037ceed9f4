"""Fleet commands of ``edgellm-server``: ``devices`` (desired vs running, drift, rejected,
last error), ``device ping|status|update|logs|retry|group ID``, ``yank``, and how a rollout
is printed. Each works on a data directory or a running server (:mod:`server.client`)."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from edgellm._click import format_option
from server.client import Target, target_options


def echo_rollout(r: dict[str, Any], *, detail: bool) -> None:
    """One rollout as `rollout status` prints it: stage, bake left, samples, gate values, devices."""
    paused = " (paused)" if r["paused"] else ""
    stages = r.get("stages") or [100]
    click.echo(
        f"{r['id']}  {r['model']} {r['version']} -> {r['group']}: {r['state']}{paused}  "
        f"stage {r.get('stage', 0) + 1}/{len(stages)} ({','.join(f'{s:g}%' for s in stages)})  "
        f"{r['on_new_version']}/{r['devices']} on {r['version']}"
    )
    if r.get("bake_left_s") is not None:
        gate = r["gate"] or "none (--no-gate)"
        click.echo(
            f"  bake: {r['bake_left_s']:.0f}s left; samples {r['samples']}/{r['min_samples'] or 'server default'}"
            f"; gate {gate}"
        )
        if r.get("gate_values"):
            vals = ", ".join(f"{k}={v:.4g}" for k, v in r["gate_values"].items() if v is not None)
            click.echo(f"  gate values now: {vals or 'no telemetry yet'}")
    if r.get("wire"):
        w = r["wire"]
        click.echo(
            f"  wire: planned {_bytes(w['planned_bytes'])} ({w['adapter_devices']} adapter "
            f"{_bytes(w['adapter_bytes'])}, {w['full_devices']} full {_bytes(w['full_bytes'])}); "
            f"reported {_bytes(w['reported_bytes'])} by {w['reporting_devices']} devices"
        )
    if r["reason"]:
        click.echo(f"  reason: {r['reason']}")
    if not detail:
        return
    for d in r["device_states"]:
        err = f"  last error: {d['last_error']}" if d.get("last_error") else ""
        got = f"/{_bytes(d['reported_bytes'])}" if d.get("reported_bytes") is not None else ""
        wire = f" {d['kind']} {_bytes(d['planned_bytes'])}{got}" if d.get("kind") else ""
        click.echo(
            f"  {d['device']:<20} {d['phase']:<8} {d['previous_version'] or '-':>10} -> {d['version'] or '-':<10} "
            f"{'converged' if d['converged'] else 'waiting'}{wire}{'' if d['online'] else ' (offline)'}{err}"
        )
    for h in r["history"]:
        click.echo(f"  {time.strftime('%H:%M:%S', time.localtime(h['ts']))} {h['state']:<12} {h['message']}")


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return (
        f"{n} B"
        if n < 1024
        else next(f"{n / f:.1f} {u}" for f, u in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")) if n >= f)
    )


def _devices_cmd() -> click.Command:
    @click.command("devices")
    @target_options
    @click.option("--group", default=None, help="Only this device group.")
    @format_option
    def devices(target: Target, group: str | None, fmt: str) -> None:
        """List devices: group, desired vs running version, drift, rejected versions, last update error."""
        rows = target.devices(group)
        if fmt == "json":
            click.echo(json.dumps(rows, indent=2, default=str))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(
            "id",
            "group",
            "profile",
            "desired",
            "running",
            "drift",
            "online",
            "health",
            "rejected",
            "last update error",
            "last seen",
        )
        for r in rows:
            seen = f"{time.time() - r['last_seen']:.0f}s ago" if r["last_seen"] else "never"
            online = ("yes (silent)" if r["stale"] else "yes") if r["online"] else "no"
            t.add_row(
                r["id"],
                r["group"],
                r["profile"] or "",
                r.get("desired") or "-",
                r["version"] or "",
                "DRIFT" if r.get("drift") else "",
                online,
                r["health"] or "",
                ",".join(r.get("rejected") or []),
                (r.get("last_error") or "")[:80],
                seen,
            )
        Console(width=200).print(t)

    return devices


def run_command(
    target: Target, device: str, name: str, args: dict[str, Any] | None, timeout_s: float
) -> dict[str, Any]:
    """Send ``name`` to ``device`` (through the running server) and wait for its reply."""
    sent = target.device_command(device, name, dict(args or {}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = next((r for r in target.device_replies(device) if r.get("id") == sent["id"]), None)
        if reply is not None:
            return reply
        time.sleep(0.3)
    raise click.ClickException(
        f"{device} did not answer {name} within {timeout_s:g}s\n  hint: is the device online, "
        "and `edgellm-server run` running (it sends the commands)?"
    )


def _device_commands(device: click.Group) -> None:
    def command(name: str, help_: str, args: dict[str, Any] | None = None) -> None:
        @device.command(name, help=help_)
        @target_options
        @click.argument("device_id")
        @click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the reply.")
        @format_option
        def cmd(target: Target, device_id: str, timeout: float, fmt: str) -> None:
            _echo_reply(run_command(target, device_id, name, args, timeout), fmt)

    command("ping", "Ask the device to answer (round trip over MQTT).")
    command("status", "The device's own status: slot, version, health, last update, rejected versions.")
    command("update", "Ask the device to check its assignment now.")
    command("logs", "The device agent's newest log lines.", {"lines": 50})
    command("retry", "Clear the device's rejected versions, then it checks its assignment again.")

    @device.command("group")
    @target_options
    @click.argument("device_id")
    @click.argument("group")
    def group_cmd(target: Target, device_id: str, group: str) -> None:
        """Move DEVICE_ID to GROUP without re-provisioning it (a signed device assignment)."""
        target.device_group(device_id, group)
        click.echo(f"{device_id} -> group {group} (the device follows at its next check; nudged over MQTT)")


def _echo_reply(reply: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(reply, indent=2, default=str))
        return
    if not reply.get("ok"):
        raise click.ClickException(
            f"{reply.get('error')}" + (f"\n  hint: {reply['hint']}" if reply.get("hint") else "")
        )
    result = reply.get("result")
    if isinstance(result, dict) and isinstance(result.get("lines"), list):
        for line in result["lines"]:
            click.echo(line)
    else:
        click.echo(json.dumps(result, indent=2, default=str))


def _yank_cmd() -> click.Command:
    @click.command("yank")
    @target_options
    @click.option("--model", required=True)
    @click.option("--version", "version", required=True)
    @click.option("--reason", default=None, help="Why (shown with the yanked version).")
    def yank(target: Target, model: str, version: str, reason: str | None) -> None:
        """Withdraw MODEL VERSION: no new assignment may name it, and devices on it are moved back."""
        moved = target.yank(model, version, reason)["moved"]
        click.echo(f"yanked {model} {version}; " + ("; ".join(moved) if moved else "no assignment named it"))

    return yank


def register(main: click.Group, device: click.Group) -> None:
    main.add_command(_devices_cmd())
    _device_commands(device)
    main.add_command(_yank_cmd())

"""``edgellm-server fl``: start a federated fine-tuning run, show runs. A running
``edgellm-server run --fl HOST:PORT`` carries the runs out; these commands only record and read
runs, on this machine's data directory or through a running server's API.

:mod:`server.cli` registers the group with :func:`register`, which adds its target options
(``--data-dir``, or ``--server``/``--token``; see :mod:`server.client`) to every command here."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import click

from edgellm._click import format_option


@click.group("fl")
def fl_group() -> None:
    """Federated LoRA fine-tuning on the devices' own data: start, status."""


def register(parent: click.Group, target_options: Any) -> None:
    """Add ``fl`` to ``parent`` (the ``edgellm-server`` group), each command taking ``target_options``."""
    for cmd in fl_group.commands.values():
        target_options(cmd)
    parent.add_command(fl_group)


@fl_group.command("start")
@click.option("--model", required=True, help="Model name (as published).")
@click.option("--version", "version", required=True, help="Base version the devices run and fine-tune.")
@click.option("--group", default="default", show_default=True, help="Device group to invite.")
@click.option("--rounds", default=3, show_default=True, type=int, help="Federated rounds.")
@click.option(
    "--min-devices",
    default=2,
    show_default=True,
    type=int,
    help="Fewer usable device updates than this: the run fails and publishes nothing.",
)
@click.option("--publish", "publish_version", required=True, help="Version to publish the fine-tuned model as.")
@click.option("--local-steps", default=20, show_default=True, type=int, help="Training steps per device and round.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Learning rate on the devices.")
@click.option("--lora-rank", default=8, show_default=True, type=int)
@click.option("--lora-alpha", default=16.0, show_default=True, type=float)
@click.option(
    "--dp-noise",
    default=0.0,
    show_default=True,
    type=float,
    help="Gaussian noise multiplier z (central DP; needs --dp-clip).",
)
@click.option("--dp-clip", default=0.0, show_default=True, type=float, help="L2 clipping norm C of each update.")
@click.option(
    "--max-epsilon", default=None, type=float, help="Devices whose privacy ledger would pass this ε are not invited."
)
@click.option("--canary", default="10%", show_default=True, help="Canary share of the rollout of --publish.")
@click.option("--gate", default="", help="Rollout gate, as in `rollout start`.")
@click.option("--no-gate", is_flag=True, help="Roll the merged model out on bake time alone (else --gate is needed).")
@click.option("--bake", default="10m", show_default=True, help="Rollout bake time, as in `rollout start`.")
@click.option("--no-rollout", is_flag=True, help="Publish only; start no rollout.")
@click.option("--invite-timeout", default="2m", show_default=True, help="How long devices have to answer.")
@click.option("--round-timeout", default="30m", show_default=True, help="How long one round may take.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the initial adapters.")
@click.option("--wait", is_flag=True, help="Block until the run ends; exit 1 if it failed.")
@format_option
def fl_start(
    target: Any,
    model: str,
    version: str,
    group: str,
    rounds: int,
    min_devices: int,
    publish_version: str,
    local_steps: int,
    lr: float,
    lora_rank: int,
    lora_alpha: float,
    dp_noise: float,
    dp_clip: float,
    max_epsilon: float | None,
    canary: str,
    gate: str,
    no_gate: bool,
    bake: str,
    no_rollout: bool,
    invite_timeout: str,
    round_timeout: str,
    seed: int,
    wait: bool,
    fmt: str,
) -> None:
    """Record a run; the running server invites GROUP, trains, averages, publishes and canaries."""
    from edgellm.durations import parse_seconds
    from server import rollout

    if not no_rollout and not gate.strip() and not no_gate:
        raise click.UsageError("the rollout of the merged model needs --gate (or --no-gate, or --no-rollout)")
    try:
        rollout.parse_percent(canary)
        rollout.Gate.parse(gate)
        parse_seconds(bake)
        inv_s, round_s = parse_seconds(invite_timeout), parse_seconds(round_timeout)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    settings = dict(
        rounds=rounds,
        min_devices=min_devices,
        local_steps=local_steps,
        lr=lr,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        dp_noise=dp_noise,
        dp_clip=dp_clip,
        max_epsilon=max_epsilon,
        canary=canary,
        gate=gate,
        bake=bake,
        rollout=not no_rollout,
        seed=seed,
        invite_timeout_s=max(1.0, inv_s),
        round_timeout_s=max(1.0, round_s),
    )
    rid = target.fl_start(model=model, version=version, publish=publish_version, group=group, settings=settings)["id"]
    if fmt == "json" and not wait:
        click.echo(json.dumps({"id": rid, "state": "pending"}))
    elif not wait:
        click.echo(
            f"federated run {rid} created: {model} {version} -> {publish_version} on group {group}\n"
            f"  a server started with `edgellm-server run ... --fl HOST:PORT` carries it out; "
            f"follow it with `edgellm-server fl status {rid}`"
        )
    if wait:
        _wait_and_show(target, rid, fmt)


@fl_group.command("status")
@click.argument("run_id", required=False)
@click.option("--wait", is_flag=True, help="Block until RUN_ID ends; exit 1 if it failed.")
@format_option
def fl_status(target: Any, run_id: str | None, wait: bool, fmt: str) -> None:
    """Show runs (or RUN_ID): state, round, devices and reasons, losses, ε, published version."""
    if wait:
        if not run_id:
            raise click.UsageError("--wait needs a RUN_ID")
        _wait_and_show(target, run_id, fmt)
        return
    _show(target.fl_status(run_id), run_id, fmt)


def _wait_and_show(target: Any, run_id: str, fmt: str, poll_s: float = 1.0) -> None:
    from server.federated.store import FINAL

    while (rows := target.fl_status(run_id))[0]["state"] not in FINAL:
        time.sleep(poll_s)
    _show(rows, run_id, fmt)
    if rows[0]["state"] == "failed":
        raise SystemExit(1)


def _show(rows: list[dict[str, Any]], run_id: str | None, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no federated runs")
    for r in rows:
        click.echo(
            f"{r['id']}  {r['model']} {r['base_version']} -> {r['version']} on {r['group']}: {r['state']}  "
            f"round {r['round']}/{r['rounds']}, {len(r['participating'])} participating, "
            f"{len(r['declining'])} not"
        )
        if r["reason"]:
            click.echo(f"  reason: {r['reason']}")
        if r["published_version"]:
            click.echo(f"  published {r['published_version']}" + (f", rollout {r['rollout']}" if r["rollout"] else ""))
        if not run_id:
            continue
        for d in r["devices"]:
            eps = d["epsilon_total"]
            eps_s = f"ε={eps:.3g}" if isinstance(eps, float) and math.isfinite(eps) else f"ε={eps}"
            click.echo(f"  {d['device']:<24} {d['status']:<9} rounds {d['rounds']}  {eps_s}  {d['reason'] or ''}")
        for rd in r["rounds_detail"]:
            click.echo(
                f"  round {rd['round']}: train loss {_f(rd['train_loss'])}, held-out {_f(rd['heldout_before'])}"
                f" -> {_f(rd['heldout_after'])} (global {_f(rd['heldout_global'])}), {rd['replies']} updates,"
                f" {rd['rejected']} refused"
            )
        for h in r["history"]:
            click.echo(f"  {time.strftime('%H:%M:%S', time.localtime(h['ts']))} {h['state']:<10} {h['message']}")


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"

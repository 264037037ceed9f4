"""The Flower ServerApp of a federated fine-tuning run (Message API).

The SuperLink starts it for a run submitted by the server's driver. ``run_config`` carries only
``edgellm-run-id`` and ``edgellm-store`` (the server's SQLite file): the run's settings, the
invited devices and the base model come from the store, and the ServerApp writes every round,
each device's outcome and the privacy ledger back into it. At the end it saves the averaged
adapters (safetensors, no pickle) next to the store and marks the run ``aggregated``; the
server's driver publishes from there.

Train/evaluate messages follow the device contract: ``arrays`` (the global adapters) and
``config`` (run-id, server-round, lora-rank, lora-alpha, local-steps, lr, base-version,
base-sha256, dp-clip, seed).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from edgellm._fs import atomic_write
from server.federated.store import FlStore
from server.federated.strategy import EdgeFedAvg, RoundReport
from server.store import Store

logger = logging.getLogger(__name__)

app = ServerApp()


def run_dir(store_path: Path, run_id: str) -> Path:
    """Where a run's files live: ``<data dir>/fl/<run id>/``."""
    return Path(store_path).parent / "fl" / run_id


class _Recorder:
    """Writes a strategy's round reports into the run store and the privacy ledger."""

    def __init__(self, fl: FlStore, run_id: str, dp_noise: float, delta: float) -> None:
        self.fl, self.run_id, self.dp_noise, self.delta = fl, run_id, dp_noise, delta
        self.rounds: dict[str, int] = {}

    def __call__(self, rep: RoundReport) -> None:
        fl, rid = self.fl, self.run_id
        for dev, reason in rep.declined:
            fl.set_device(rid, dev, "declined", reason)
        invited = {d["device"] for d in fl.devices(rid)}
        for who, reason in rep.rejected:
            if who in invited:
                fl.set_device(rid, who, "lost" if reason.startswith("no reply") else "rejected", reason)
            else:
                fl.log(rid, "running", f"round {rep.round} {rep.phase}: {who}: {reason}")
        if rep.phase == "evaluate":
            if "heldout-loss" in rep.metrics:
                fl.record_round(rid, rep.round, heldout_global=rep.metrics["heldout-loss"])
            return
        for r in rep.accepted:
            self.rounds[r.device] = self.rounds.get(r.device, 0) + 1
            fl.set_device(
                rid,
                r.device,
                "trained",
                data_sha256=r.data_sha256[:128],
                num_examples=r.num_examples,
                rounds=self.rounds[r.device],
            )
        m = rep.metrics
        fl.record_round(
            rid,
            rep.round,
            train_loss=m.get("train-loss"),
            heldout_before=m.get("heldout-loss-before"),
            heldout_after=m.get("heldout-loss-after"),
            replies=len(rep.accepted),
            rejected=len(rep.rejected) + len(rep.declined),
            noise_std=rep.noise_std,
        )
        if rep.accepted:
            zs = rep.noise_multipliers if self.dp_noise > 0 else {r.device: 0.0 for r in rep.accepted}
            fl.spend(rid, rep.round, zs, self.delta)
        fl.db.execute("UPDATE fl_runs SET round=? WHERE id=?", (rep.round, rid))
        fl.log(
            rid,
            "running",
            f"round {rep.round}: {len(rep.accepted)} update(s) averaged, "
            f"{len(rep.rejected)} rejected or lost, {len(rep.declined)} declined",
        )


def base_adapters(
    base_bundle: Path, rank: int, alpha: float, seed: int
) -> tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
    """The adapter shapes a reply must match and round 1's adapters (A kaiming-uniform from
    ``seed``, B zero: the first global model is the base), from the base bundle's GGUF."""
    import tempfile

    from edgellm.bundle import unpack
    from edgellm.pipeline.lora import LoraConfig, expected_shapes, initial_lora_state, load_gguf_model

    with tempfile.TemporaryDirectory(prefix=".fl-base-", dir=base_bundle.parent) as tmp:
        manifest = unpack(base_bundle, Path(tmp) / "b")  # verified against its manifest first
        cfg = load_gguf_model(Path(tmp) / "b" / manifest.artifact).config
    lcfg = LoraConfig(rank=rank, alpha=alpha)
    shapes = {k: tuple(v) for k, v in expected_shapes(cfg, lcfg).items()}
    return shapes, {k: v.numpy().astype(np.float32) for k, v in initial_lora_state(cfg, lcfg, seed).items()}


def train_config(run: dict[str, Any]) -> ConfigRecord:
    s, plan = run["settings"], run["plan"]
    return ConfigRecord(
        {
            "run-id": run["id"],
            "server-round": 0,
            "lora-rank": s.lora_rank,
            "lora-alpha": float(s.lora_alpha),
            "local-steps": s.local_steps,
            "lr": float(s.lr),
            "base-version": run["base_version"],
            "base-sha256": plan.get("base_sha256", ""),
            "dp-clip": float(s.dp_clip),
            "seed": s.seed,
        }
    )


def run_federated(
    fl: FlStore, run_id: str, grid: Grid, base: tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]] | None = None
) -> Path:
    """Carry out the run's rounds on ``grid``; returns the averaged adapters file. ``base``
    (shapes, initial adapters) defaults to :func:`base_adapters` of the run's base bundle."""
    from safetensors.numpy import save as st_save

    run = fl.run(run_id)
    s, plan = run["settings"], run["plan"]
    shapes, initial = base or base_adapters(Path(plan["train_bundle"]), s.lora_rank, s.lora_alpha, s.seed)
    allowed = {d["device"] for d in fl.devices(run_id) if d["status"] == "accepted"}
    strategy = EdgeFedAvg(
        expected=shapes,
        min_replies=s.min_devices,
        allowed=allowed,
        expected_nodes=len(allowed),
        dp_clip=s.dp_clip,
        dp_noise=s.dp_noise,
        connect_timeout_s=s.invite_timeout_s,
        report=_Recorder(fl, run_id, s.dp_noise, s.delta),
    )
    init = ArrayRecord({k: Array(np.asarray(initial[k], dtype=np.float32)) for k in sorted(shapes)})
    cfg = train_config(run)
    result = strategy.start(
        grid=grid,
        initial_arrays=init,
        num_rounds=s.rounds,
        timeout=s.round_timeout_s,
        train_config=cfg,
        evaluate_config=ConfigRecord(dict(cfg)),
    )
    if not result.arrays or len(result.arrays) == 0:
        raise RuntimeError("no round produced an average")
    data = st_save(
        {k: result.arrays[k].numpy() for k in sorted(result.arrays.keys())},
        metadata={"run": run_id, "base_version": run["base_version"]},
    )
    assert fl.store.path is not None  # federated runs keep their files next to the SQLite store
    out = run_dir(fl.store.path, run_id) / "adapters.safetensors"
    atomic_write(out, data, mode=0o600)
    trained = {e["device"] for e in fl.ledger(run_id=run_id)}
    fl.set_state(
        run_id,
        "aggregated",
        f"{s.rounds} rounds done; updates of {len(trained)} device(s) averaged",
        result={
            "adapters": str(out),
            "adapters_sha256": hashlib.sha256(data).hexdigest(),
            "rounds": s.rounds,
            "devices": len(trained),
        },
    )
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    run_id, store_path = str(cfg.get("edgellm-run-id", "")), str(cfg.get("edgellm-store", ""))
    if not run_id or not store_path:
        raise ValueError("run config needs edgellm-run-id and edgellm-store (the server's driver sets them)")
    fl = FlStore(Store(store_path))
    try:
        run_federated(fl, run_id, grid)
    except Exception as e:
        logger.exception("federated run %s failed", run_id)
        fl.fail(run_id, " ".join(str(e).split())[:600] or type(e).__name__)
        raise

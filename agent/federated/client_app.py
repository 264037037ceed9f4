"""The device's Flower ClientApp (Message API): LoRA adapters trained on local text.

A SuperNode started by :mod:`agent.federated.supervisor` runs this app for each message. It finds
its device from ``context.node_config`` (``device-id``, ``agent-dir``), checks it may take part
(:mod:`agent.federated.device`), loads the GGUF it serves as a frozen float32 base, applies the
run's global adapters and

- ``train``: measures the held-out loss, trains ``local-steps`` steps, measures again, and replies
  with the new adapter tensors (clipped to ``dp-clip`` around the global ones when set), metrics
  and a device record;
- ``evaluate``: replies with the held-out loss of the global adapters.

Only adapter tensors, numbers and hashes leave the device. A device that declines replies with
``num-examples`` 0 and a ``decline-reason``, and no arrays. Failures are declined with the reason
``failed`` and the error's type only: an error message could quote local text.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from agent.config import AgentConfig, AgentPaths
from agent.federated import device as dev
from edgellm.ids import valid_id

log = logging.getLogger(__name__)

app = ClientApp()


@dataclasses.dataclass(frozen=True)
class RoundConfig:
    """The server's ``config`` record, typed and bounded."""

    run_id: str
    server_round: int
    lora_rank: int
    lora_alpha: float
    local_steps: int
    lr: float
    base_sha256: str
    dp_clip: float = 0.0
    seed: int = 0
    batch_size: int = 4
    seq_len: int = 64

    @classmethod
    def from_record(cls, rec: Any) -> RoundConfig:
        def num(key: str, kind: type, lo: float, hi: float, default: Any = None) -> Any:
            v = rec.get(key, default)
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise dev.Decline(dev.BAD_REQUEST, f"config {key!r} is missing or not a number")
            if kind is int and (not isinstance(v, int)):
                raise dev.Decline(dev.BAD_REQUEST, f"config {key!r} must be an integer")
            if not (math.isfinite(v) and lo <= v <= hi):
                raise dev.Decline(dev.BAD_REQUEST, f"config {key!r}={v!r} is outside [{lo}, {hi}]")
            return kind(v)

        run_id, sha = rec.get("run-id"), rec.get("base-sha256")
        if not valid_id(run_id):
            raise dev.Decline(dev.BAD_REQUEST, "config 'run-id' is missing or malformed")
        if not dev.valid_sha256(sha):
            raise dev.Decline(dev.BAD_REQUEST, "config 'base-sha256' must be 64 lowercase hex digits")
        return cls(
            run_id=run_id,
            server_round=num("server-round", int, 0, 100_000),
            lora_rank=num("lora-rank", int, 1, 256),
            lora_alpha=num("lora-alpha", float, 1e-6, 1e4),
            local_steps=num("local-steps", int, 1, 10_000),
            lr=num("lr", float, 1e-9, 1.0),
            base_sha256=sha,
            dp_clip=num("dp-clip", float, 0.0, 1e6, 0.0),
            seed=num("seed", int, 0, 2**31 - 1, 0),
            batch_size=num("batch-size", int, 1, 64, 4),
            seq_len=num("seq-len", int, 8, 4096, 64),
        )


def _device(context: Context) -> tuple[AgentPaths, AgentConfig]:
    agent_dir = context.node_config.get("agent-dir")
    if not isinstance(agent_dir, str) or not agent_dir:
        raise dev.Decline(
            dev.BAD_REQUEST,
            "the SuperNode has no 'agent-dir' in its node config",
            hint="start it with `--node-config \"agent-dir='/path' device-id='ID'\"`",
        )
    paths = AgentPaths(agent_dir)
    config = AgentConfig.load(paths)
    if context.node_config.get("device-id") not in (None, config.device_id):
        raise dev.Decline(
            dev.BAD_REQUEST,
            "the node config's device-id is not this agent's",
            hint="the SuperNode was started for another agent dir",
        )
    return paths, config


def _reply(
    msg: Message,
    device_id: str,
    *,
    metrics: dict[str, Any],
    data_sha256: str = "",
    decline: str = "",
    arrays: dict | None = None,
) -> Message:
    content = RecordDict(
        {
            "metrics": MetricRecord(metrics),
            "device": ConfigRecord({"device-id": device_id, "data-sha256": data_sha256, "decline-reason": decline}),
        }
    )
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content, reply_to=msg)


def _decline(msg: Message, device_id: str, e: BaseException) -> Message:
    if isinstance(e, dev.Decline):
        reason = e.reason
        log.info("declined: %s", e)
    else:  # an unexpected error: its text could quote local data, so only its type leaves
        reason = f"{dev.FAILED}: {type(e).__name__}"
        log.exception("federated round failed")
    metrics: dict[str, Any] = {"num-examples": 0}
    if msg.metadata.message_type.startswith("train"):
        metrics.update({"train-loss": 0.0, "heldout-loss-before": 0.0, "heldout-loss-after": 0.0})
    else:
        metrics["heldout-loss"] = 0.0
    return _reply(msg, device_id, metrics=metrics, decline=reason)


@dataclasses.dataclass
class _Round:
    """What one message works with, after every check passed."""

    config: AgentConfig
    rc: RoundConfig
    model: Any
    tok: Any
    data: dev.LocalData
    global_state: dict[str, Any]


def _prepare(msg: Message, context: Context) -> _Round:
    """Checks, the base model with the global adapters applied, the tokenizer and the data."""
    import torch

    from edgellm.errors import BuildError
    from edgellm.pipeline import lora

    torch.set_num_threads(1)
    paths, config = _device(context)
    if "config" not in msg.content:
        raise dev.Decline(dev.BAD_REQUEST, "the message has no 'config' record")
    rc = RoundConfig.from_record(msg.content["config"])
    base = dev.check_can_train(paths, config, rc.base_sha256)
    data = dev.local_data(paths, config)
    if "arrays" not in msg.content:
        raise dev.Decline(dev.BAD_REQUEST, "the message has no 'arrays' record (the global adapters)")
    model = lora.load_gguf_model(base.artifact)
    lora.apply_lora(model, lora.LoraConfig(rank=rc.lora_rank, alpha=rc.lora_alpha))
    try:
        arrays = msg.content.array_records["arrays"]
        global_state = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
        lora.load_lora_state(model, global_state)
    except (ValueError, TypeError) as e:
        raise dev.Decline(dev.BAD_REQUEST, f"the global adapters do not fit this model ({type(e).__name__})") from e
    except BuildError as e:
        raise dev.Decline(dev.BAD_REQUEST, e.args[0], hint=e.hint) from e
    return _Round(config, rc, model, _tokenizer(base), data, global_state)


def _handle(msg: Message, context: Context, work: Callable[[_Round], tuple[dict, dict | None]]) -> Message:
    """Run ``work`` (-> metrics, arrays) on a prepared round; any failure becomes a decline."""
    device_id = str(context.node_config.get("device-id", ""))
    try:
        r = _prepare(msg, context)
        device_id = r.config.device_id
        metrics, arrays = work(r)
    except Exception as e:  # noqa: BLE001 - every failure becomes a decline the server can count
        return _decline(msg, device_id, e)
    return _reply(msg, device_id, metrics=metrics, data_sha256=r.data.sha256, arrays=arrays)


def _tokenizer(base: dev.TrainingBase) -> Any:
    from edgellm.pipeline.gguf_load import gguf_tokenizer
    from edgellm.pipeline.tokenizer import load_tokenizer

    return load_tokenizer(base.tokenizer) if base.tokenizer is not None else gguf_tokenizer(base.artifact)


def clip_update(new: dict[str, Any], old: dict[str, Any], clip: float) -> dict[str, Any]:
    """``old + delta * min(1, clip / ||delta||)`` over all tensors together (no-op when clip is 0)."""
    import torch

    if clip <= 0:
        return new
    norm = math.sqrt(sum(float(torch.sum((new[k] - old[k]).double() ** 2)) for k in new))
    if norm <= clip:
        return new
    scale = clip / norm
    return {k: old[k] + (new[k] - old[k]) * scale for k in new}


def _train(r: _Round) -> tuple[dict, dict | None]:
    from edgellm.pipeline import lora

    seq = min(r.rc.seq_len, r.model.config.max_position_embeddings)
    before = lora.heldout_loss(r.model, r.tok, r.data.heldout, seq_len=seq)
    stats = lora.train_lora(
        r.model,
        r.tok,
        r.data.train,
        lora.lora_config_of(r.model),
        r.rc.local_steps,
        r.rc.lr,
        heldout=r.data.heldout,
        batch_size=r.rc.batch_size,
        seq_len=seq,
        seed=r.rc.seed + r.rc.server_round,
        max_seconds=r.config.fl_timeout_s,
    )
    after = float(stats["val_loss"])
    update = clip_update(lora.lora_state(r.model), r.global_state, r.rc.dp_clip)
    lora.check_lora_state(update, {k: tuple(v.shape) for k, v in r.global_state.items()})
    log.info("trained round %d of %s: held-out loss %.4f -> %.4f", r.rc.server_round, r.rc.run_id, before, after)
    metrics = {
        "num-examples": int(stats["num_examples"]),
        "train-loss": float(stats["final_train_loss"]),
        "heldout-loss-before": float(before),
        "heldout-loss-after": after,
    }
    return metrics, {k: v.contiguous() for k, v in update.items()}


def _evaluate(r: _Round) -> tuple[dict, dict | None]:
    from edgellm.pipeline import lora
    from edgellm.pipeline.train import val_loss

    windows = lora.heldout_windows(r.model, r.tok, r.data.heldout, r.rc.seq_len)
    return {"num-examples": int(windows.size), "heldout-loss": float(val_loss(r.model, windows))}, None


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context, _evaluate)

"""The run's Flower strategy: FedAvg weighted by ``num-examples`` that refuses what it cannot trust.

Every device reply is checked before anything is averaged (:func:`check_train_reply`):

* the ``device`` ConfigRecord names a device invited to this run, once per round; a non-empty
  ``decline-reason`` is a decline (recorded, not averaged);
* ``arrays`` holds exactly the adapter keys the server sent, each with the expected shape, a
  floating dtype and only finite values;
* ``metrics`` holds ``num-examples`` (an int in 1..MAX_EXAMPLES) and finite losses.

A reply that fails is *rejected* with its reason and left out; a reply that never came (a device
killed mid-round: the SuperLink answers for it with an error) is recorded as lost. If fewer than
``min_replies`` usable replies remain the round raises :class:`RunFailed` and nothing is averaged.

Differential privacy (``dp_clip`` C > 0, ``dp_noise`` z > 0): each update (reply minus the global
adapters sent) is clipped to L2 norm C here, whatever the device did (Flower's
``compute_clip_model_update``), the clipped replies are averaged with weights w_i (num-examples,
normalised), and Gaussian noise of standard deviation ``z * C * max_i w_i`` is added (Flower's
``add_gaussian_noise_inplace``). Device i's contribution to the average moves by at most
``w_i * C``, so for device i this round is a Gaussian mechanism with noise multiplier
``z_i = z * max_j w_j / w_i >= z``: with equal weights this is Flower's ``z * C / n``. The z_i go to
the privacy ledger (:mod:`server.federated.privacy`).

Flower's own ``DifferentialPrivacyServerSideFixedClipping`` wrapper is not used: it skips a whole
round when any reply carries an error (a device killed mid-round), clips before our validation
could refuse a malformed reply, sizes the noise for a fixed number of clients, and its accountant
demands equal weights and an unmodified ``FedAvg.aggregate_train``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_clip_model_update

from edgellm.errors import EdgeLLMError
from edgellm.ids import valid_id

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 10_000_000
MAX_LOSS = 1e6
TRAIN_METRICS = ("train-loss", "heldout-loss-before", "heldout-loss-after")
EVAL_METRICS = ("heldout-loss",)
_FLOAT_KINDS = "f"


class RunFailed(EdgeLLMError):
    """The run cannot go on (too few devices, too few usable replies)."""


class Rejected(Exception):
    """A reply that is not averaged; ``declined`` when the device said no rather than sent junk."""

    def __init__(self, reason: str, device: str | None = None, declined: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.device = device
        self.declined = declined


@dataclasses.dataclass
class Reply:
    """A reply that passed every check."""

    node: int
    device: str
    num_examples: int
    data_sha256: str
    metrics: dict[str, float]
    message: Message
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RoundReport:
    """What one round did, for the run store and the privacy ledger."""

    round: int
    phase: str  # "train" | "evaluate"
    accepted: list[Reply] = dataclasses.field(default_factory=list)
    declined: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (device, reason)
    rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (device or node, reason)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    noise_std: float = 0.0
    noise_multipliers: dict[str, float] = dataclasses.field(default_factory=dict)  # device -> z_i


def _device_record(msg: Message) -> tuple[str, str, str]:
    rec = msg.content.config_records.get("device")
    if rec is None:
        raise Rejected("no 'device' record in the reply")
    dev, sha, decline = rec.get("device-id"), rec.get("data-sha256", ""), rec.get("decline-reason", "")
    if not isinstance(dev, str) or not valid_id(dev):
        raise Rejected(f"device-id {str(dev)[:80]!r} is not a valid id")
    if not isinstance(sha, str) or len(sha) > 128 or not isinstance(decline, str) or len(decline) > 512:
        raise Rejected("data-sha256 / decline-reason are not short strings", device=dev)
    return dev, sha, decline


def _metrics(msg: Message, names: tuple[str, ...], device: str) -> tuple[int, dict[str, float]]:
    rec = msg.content.metric_records.get("metrics")
    if rec is None or len(msg.content.metric_records) != 1:
        raise Rejected("expected exactly one MetricRecord named 'metrics'", device=device)
    n = rec.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_EXAMPLES:
        raise Rejected(f"num-examples must be an int in 1..{MAX_EXAMPLES}", device=device)
    out: dict[str, float] = {}
    for k in names:
        v = rec.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > MAX_LOSS:
            raise Rejected(f"metric {k!r} is missing or not a finite number", device=device)
        out[k] = float(v)
    return n, out


def check_arrays(
    msg: Message, expected: dict[str, tuple[int, ...]], device: str | None = None
) -> dict[str, np.ndarray]:
    """The reply's adapter tensors, or :class:`Rejected` if keys, shapes, dtype or values are wrong."""
    if len(msg.content.array_records) != 1 or "arrays" not in msg.content.array_records:
        raise Rejected("expected exactly one ArrayRecord named 'arrays'", device=device)
    rec = msg.content.array_records["arrays"]
    keys = set(rec.keys())
    if keys != set(expected):
        missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
        raise Rejected(f"adapter keys differ: missing {missing[:3]}, unexpected {extra[:3]}", device=device)
    out = {}
    for k, shape in expected.items():
        try:
            a = rec[k].numpy()
        except Exception as e:  # noqa: BLE001 - whatever the bytes do, the reply is refused
            raise Rejected(f"{k}: not a readable numpy array ({type(e).__name__})", device=device) from None
        if tuple(a.shape) != tuple(shape):
            raise Rejected(f"{k}: shape {tuple(a.shape)} != expected {tuple(shape)}", device=device)
        if a.dtype.kind not in _FLOAT_KINDS:
            raise Rejected(f"{k}: dtype {a.dtype} is not floating point", device=device)
        if not np.isfinite(a).all():
            raise Rejected(f"{k}: contains NaN or infinite values", device=device)
        out[k] = a.astype(np.float32, copy=False)
    return out


def check_reply(
    msg: Message, phase: str, expected: dict[str, tuple[int, ...]], allowed: set[str] | None, seen: set[str]
) -> Reply:
    """One reply checked for ``phase`` ("train": arrays + train metrics; "evaluate": held-out loss)."""
    if msg.has_error():
        raise Rejected(f"no reply: {str(msg.error.reason)[:200]}")
    device, sha, decline = _device_record(msg)
    if allowed is not None and device not in allowed:
        raise Rejected(f"device {device} was not invited to this run", device=device)
    if device in seen:
        raise Rejected(f"second reply claiming device {device} in one round", device=device)
    seen.add(device)
    if decline:
        raise Rejected(decline, device=device, declined=True)
    n, metrics = _metrics(msg, TRAIN_METRICS if phase == "train" else EVAL_METRICS, device)
    arrays = check_arrays(msg, expected, device) if phase == "train" else {}
    # Only what was checked goes on to Flower's FedAvg (which wants identical keys in every reply).
    msg.content["metrics"] = MetricRecord({"num-examples": n, **metrics})
    if arrays:
        msg.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Reply(
        node=msg.metadata.src_node_id,
        device=device,
        num_examples=n,
        data_sha256=sha,
        metrics=metrics,
        message=msg,
        arrays=arrays,
    )


class EdgeFedAvg(FedAvg):
    """FedAvg over every connected SuperNode, weighted by ``num-examples``, with reply validation,
    a connection deadline instead of an endless wait, and optional central DP (module docstring).

    ``report(RoundReport)`` is called after each train and evaluate aggregation."""

    def __init__(
        self,
        *,
        expected: dict[str, tuple[int, ...]],
        min_replies: int,
        allowed: set[str] | None = None,
        expected_nodes: int | None = None,
        dp_clip: float = 0.0,
        dp_noise: float = 0.0,
        connect_timeout_s: float = 300.0,
        report: Callable[[RoundReport], None] | None = None,
    ) -> None:
        if min_replies < 1:
            raise ValueError("min_replies must be at least 1")
        if dp_noise < 0 or dp_clip < 0 or (dp_noise > 0 and dp_clip <= 0):
            raise ValueError("DP noise needs a positive clipping norm (dp_clip)")
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=min_replies,
            min_evaluate_nodes=min_replies,
            min_available_nodes=min_replies,
            weighted_by_key="num-examples",
        )
        self.expected = {k: tuple(v) for k, v in expected.items()}
        self.min_replies = min_replies
        self.allowed = allowed
        self.expected_nodes = max(expected_nodes or min_replies, min_replies)
        self.dp_clip = dp_clip
        self.dp_noise = dp_noise
        self.connect_timeout_s = connect_timeout_s
        self.report = report or (lambda r: None)
        self.current: ArrayRecord | None = None
        self.node_device: dict[int, str] = {}
        self._sent: list[Message] = []  # the grid gives each its message id when it pushes it

    # -- sampling: every connected node, waiting a bounded time for the invited ones

    def _nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            nodes = list(grid.get_node_ids())
            if len(nodes) >= self.expected_nodes or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        if len(nodes) < self.min_replies:
            raise RunFailed(
                f"only {len(nodes)} device(s) connected to the SuperLink within "
                f"{self.connect_timeout_s:.0f}s; the run needs {self.min_replies}",
                hint="check the devices' fl_state events (`edgellm-server fl status`) and that "
                "they can reach the SuperLink address",
            )
        return nodes

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays
        config["server-round"] = server_round
        from flwr.app import MessageType, RecordDict

        rec = RecordDict({"arrays": arrays, "config": config})
        self._sent = list(self._construct_messages(rec, self._nodes(grid), MessageType.TRAIN))
        return self._sent

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["server-round"] = server_round
        from flwr.app import MessageType, RecordDict

        rec = RecordDict({"arrays": arrays, "config": config})
        self._sent = list(self._construct_messages(rec, list(grid.get_node_ids()), MessageType.EVALUATE))
        return self._sent

    # -- aggregation

    def _screen(self, server_round: int, phase: str, replies: Iterable[Message]) -> RoundReport:
        rep = RoundReport(round=server_round, phase=phase)
        seen: set[str] = set()
        for msg in replies:
            try:
                r = check_reply(msg, phase, self.expected, self.allowed, seen)
            except Rejected as e:
                node = self._node_of(msg)
                who = e.device or self.node_device.get(node) or f"node {node}"
                (rep.declined if e.declined else rep.rejected).append((who, e.reason))
                logger.warning(
                    "round %d %s: %s %s: %s",
                    server_round,
                    phase,
                    who,
                    "declined" if e.declined else "rejected",
                    e.reason,
                )
                continue
            self.node_device[r.node] = r.device
            rep.accepted.append(r)
        return rep

    def _node_of(self, msg: Message) -> int:
        """The node a reply is about: its sender, or for an error the SuperLink wrote in a lost
        node's stead, the destination of the message it answers."""
        if not msg.has_error():
            return msg.metadata.src_node_id
        for m in self._sent:
            if m.metadata.message_id and m.metadata.message_id == msg.metadata.reply_to_message_id:
                return m.metadata.dst_node_id
        return msg.metadata.src_node_id

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rep = self._screen(server_round, "train", replies)
        if len(rep.accepted) < self.min_replies:
            self.report(rep)
            reasons = "; ".join(f"{d}: {r}" for d, r in (rep.rejected + rep.declined)[:5])
            raise RunFailed(
                f"round {server_round}: {len(rep.accepted)} usable update(s), the run needs "
                f"{self.min_replies}" + (f" ({reasons})" if reasons else ""),
                hint="see the declining and rejected devices in `edgellm-server fl status`",
            )
        if self.dp_clip > 0 and self.current is not None:
            self._clip(rep.accepted)
        arrays, metrics = super().aggregate_train(server_round, [r.message for r in rep.accepted])
        total = sum(r.num_examples for r in rep.accepted)
        max_w = max(r.num_examples for r in rep.accepted) / total
        if arrays is not None and self.dp_noise > 0:
            rep.noise_std = self.dp_noise * self.dp_clip * max_w
            arrays = _with_noise(arrays, rep.noise_std)
            rep.noise_multipliers = {r.device: self.dp_noise * max_w / (r.num_examples / total) for r in rep.accepted}
        rep.metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        self.report(rep)
        return arrays, metrics

    def _clip(self, accepted: list[Reply]) -> None:
        assert self.current is not None
        keys = list(self.expected)
        base = [self.current[k].numpy().astype(np.float32) for k in keys]
        for r in accepted:
            upd = [r.arrays[k].copy() for k in keys]
            compute_clip_model_update(param1=upd, param2=base, clipping_norm=self.dp_clip)
            r.message.content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(keys, upd, strict=True)})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rep = self._screen(server_round, "evaluate", replies)
        metrics = super().aggregate_evaluate(server_round, [r.message for r in rep.accepted]) if rep.accepted else None
        rep.metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        self.report(rep)
        return metrics


def _with_noise(arrays: ArrayRecord, std: float) -> ArrayRecord:
    keys = list(arrays.keys())
    nd = [arrays[k].numpy().astype(np.float32) for k in keys]
    add_gaussian_noise_inplace(nd, std)
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in zip(keys, nd, strict=True)})


def to_json_safe(rep: RoundReport) -> dict[str, Any]:
    """A round report without the Flower messages (for logs and the store)."""
    return {
        "round": rep.round,
        "phase": rep.phase,
        "metrics": rep.metrics,
        "noise_std": rep.noise_std,
        "accepted": [
            {"device": r.device, "num_examples": r.num_examples, "data_sha256": r.data_sha256, "metrics": r.metrics}
            for r in rep.accepted
        ],
        "declined": [list(x) for x in rep.declined],
        "rejected": [list(x) for x in rep.rejected],
        "noise_multipliers": rep.noise_multipliers,
    }

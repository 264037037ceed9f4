"""Typed rows the store returns. Subscripting (``row["version"]``) reads the attribute of the
same name, and :meth:`Row.to_dict` is the JSON shape the HTTP API serves."""

from __future__ import annotations

import dataclasses
from typing import Any


class Row:
    """Mixin for the frozen dataclasses below."""

    def __getitem__(self, name: str) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]  # a mixin: self is a dataclass


@dataclasses.dataclass(frozen=True)
class DeviceRow(Row):
    """One device in the registry. ``stale``: online by its last birth but silent for a while
    (a death may have been lost, e.g. in a broker restart)."""

    id: str
    profile: str | None
    group: str
    version: str | None
    model: str | None
    slot: str | None
    health: str | None
    online: bool
    session: str | None
    first_seen: float | None
    last_seen: float | None
    outbox_dropped: int
    outbox_pending: int
    stale: bool


@dataclasses.dataclass(frozen=True)
class EventRow(Row):
    device: str
    seq: int
    ts: float
    received: float
    name: str
    fields: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class MetricSummary(Row):
    """Count-weighted aggregate of metrics rows (p50/p95: weighted means of per-interval values)."""

    count: int = 0
    errors: int = 0
    error_rate: float | None = None
    p50_latency_ms: float | None = None
    p95_latency_ms: float | None = None
    tokens_per_second: float | None = None
    mean_logprob: float | None = None
    max_p95_latency_ms: float | None = None


@dataclasses.dataclass(frozen=True)
class SeriesPoint(Row):
    key: str
    t: float
    count: int
    errors: int
    p95_latency_ms: float | None
    p50_latency_ms: float | None
    tokens_per_second: float | None
    mean_logprob: float | None
    error_rate: float | None


@dataclasses.dataclass(frozen=True)
class QuarantineRow(Row):
    """A telemetry message set aside: why, where from, and its first bytes."""

    id: int
    received: float
    topic: str
    reason: str
    detail: str
    size: int
    payload: bytes


@dataclasses.dataclass(frozen=True)
class RolloutRow(Row):
    id: str
    model: str
    version: str
    group: str
    canary_pct: float
    gate: str
    bake_s: float
    state: str
    reason: str | None
    paused: bool
    created: float
    updated: float
    phase_started: float | None
    request: str | None


@dataclasses.dataclass(frozen=True)
class RolloutDeviceRow(Row):
    """A device taking part in a rollout, with what it ran before and what it reports now."""

    device: str
    phase: str
    previous_version: str | None
    previous_model: str | None
    version: str | None
    online: bool


@dataclasses.dataclass(frozen=True)
class LogEntry(Row):
    ts: float
    state: str
    message: str


@dataclasses.dataclass(frozen=True)
class TokenRow(Row):
    """An API token (its hash only: the token itself is shown once, when made)."""

    id: str
    name: str
    role: str
    created: float
    revoked: float | None
    last_used: float | None


@dataclasses.dataclass(frozen=True)
class AuditRow(Row):
    """One operator action through the API: who, what, when, result."""

    id: int
    ts: float
    token: str | None
    who: str
    role: str | None
    action: str
    target: str
    status: int
    result: str


@dataclasses.dataclass(frozen=True)
class Choice(Row):
    """One device's part of a rollout's release (:mod:`server.release`): the assignment's base
    and adapter, and the bundle it downloads with that bundle's TUF target length."""

    kind: str  # "adapter" | "full"
    model: str
    version: str  # the base the assignment names (the device's own version when it gets the adapter)
    target: str | None  # the bundle the device downloads (None: none built for its profile)
    bytes: int | None
    adapter: str | None = None
    adapter_version: str | None = None

    @property
    def adapters(self) -> tuple[Any, ...]:
        """The assignment's adapters (:class:`edgellm.trust.director.AssignedAdapter`)."""
        from edgellm.trust.director import AssignedAdapter

        if self.adapter is None or self.adapter_version is None or self.target is None:
            return ()
        return (AssignedAdapter(self.adapter, self.adapter_version, (self.target,)),)

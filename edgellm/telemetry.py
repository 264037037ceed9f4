"""Telemetry wire format shared by the agent and the server: topic names and typed messages.

Everything on the wire is versioned (``edgellm/v1/...`` topics, ``"v": 1`` in every payload) and
every record keeps the fields it does not know in ``extra`` so a newer peer never breaks an
older one.

Topics (``{prefix}`` = ``edgellm/v1``)::

    {prefix}/dev/{device}/{kind}       agent -> server   kind: birth | death | heartbeat |
                                                          metrics | event | reply
    {prefix}/desired/device/{device}   server -> agent   retained desired state for one device
    {prefix}/desired/group/{group}     server -> agent   retained desired state for a group
    {prefix}/cmd/{device}              server -> agent   commands (answered with kind=reply)

Agent messages share one :class:`Envelope`: ``device``, ``kind``, ``seq`` (monotonic per device,
persisted by the agent's outbox; ``0`` for the unsequenced birth/death connection-state
messages), ``ts`` and a kind-specific ``body`` (:class:`Birth`, :class:`Death`,
:class:`Heartbeat`, :class:`Metrics`, :class:`Event`). The server deduplicates on
``(device, epoch, seq)``: ``epoch`` is a random id the outbox draws when it is created, so a
device whose outbox was wiped (re-provisioned, factory reset) starts a new sequence instead of
having its fresh messages dropped as duplicates. Birth and death carry a ``session`` id so a late last-will from an old
connection never marks a reconnected device offline (Sparkplug's bdSeq idea).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, ClassVar
from urllib.parse import urlparse

from edgellm._record import Record
from edgellm.errors import EdgeLLMError

WIRE_VERSION = 1
PREFIX = f"edgellm/v{WIRE_VERSION}"
SHARE_GROUP = "edgellm"
MAX_PAYLOAD_BYTES = 64 * 1024
KINDS = ("birth", "death", "heartbeat", "metrics", "event", "reply")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TelemetryError(EdgeLLMError):
    """A telemetry message or MQTT setting is malformed."""


def valid_id(s: Any) -> bool:
    """Device ids and group names: 1-128 chars of [A-Za-z0-9._-] (safe inside a topic)."""
    return isinstance(s, str) and bool(_ID_RE.match(s))


# --------------------------------------------------------------------------- topics


def device_topic(device: str, kind: str) -> str:
    return f"{PREFIX}/dev/{device}/{kind}"


def device_wildcard() -> str:
    return f"{PREFIX}/dev/+/+"


def shared_device_subscription(group: str = SHARE_GROUP) -> str:
    """MQTT 5 shared subscription: several server processes split the ingest load."""
    return f"$share/{group}/{device_wildcard()}"


def desired_device_topic(device: str) -> str:
    return f"{PREFIX}/desired/device/{device}"


def desired_group_topic(group: str) -> str:
    return f"{PREFIX}/desired/group/{group}"


def command_topic(device: str) -> str:
    return f"{PREFIX}/cmd/{device}"


def parse_device_topic(topic: str) -> tuple[str, str] | None:
    """``edgellm/v1/dev/{device}/{kind}`` -> (device, kind), or None if it is not one."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{PREFIX}/dev":
        return None
    return parts[3], parts[4]


# --------------------------------------------------------------------------- records


class _Record(Record):
    """Wire records: unknown fields kept in ``extra``; known fields type-checked."""

    error = TelemetryError
    _types: ClassVar[dict[str, tuple[type, ...]]] = {}

    @classmethod
    def from_dict(cls, d: Any) -> Any:
        known, _ = cls.split(d)
        for k, v in known.items():
            types = cls._types.get(k)
            if types and v is not None and not (isinstance(v, types) and not (isinstance(v, bool) and bool not in types)):
                raise TelemetryError(f"{cls.__name__}.{k}: expected {'/'.join(t.__name__ for t in types)}, got {type(v).__name__}")
        return super().from_dict(d)


_NUM = (int, float)
_STR = (str,)
_INT = (int,)


@dataclasses.dataclass
class Birth(_Record):
    """Sent on every (re)connect. ``session`` matches the last will set for that connection."""

    session: str
    profile: str = ""
    group: str = "default"
    version: str | None = None
    model: str | None = None
    slot: str | None = None
    health: str | None = None
    agent_version: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    _types: ClassVar = {"session": _STR, "profile": _STR, "group": _STR, "version": _STR, "model": _STR,
                        "slot": _STR, "health": _STR}


@dataclasses.dataclass
class Death(_Record):
    """The last will (``reason="lost"``) or a clean goodbye (``reason="stop"``)."""

    session: str
    reason: str = "lost"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    _types: ClassVar = {"session": _STR, "reason": _STR}


@dataclasses.dataclass
class Heartbeat(_Record):
    uptime_s: float = 0.0
    version: str | None = None
    model: str | None = None
    slot: str | None = None
    health: str | None = None
    profile: str | None = None
    group: str | None = None
    outbox_pending: int = 0
    outbox_dropped: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    _types: ClassVar = {"uptime_s": _NUM, "version": _STR, "model": _STR, "health": _STR,
                        "outbox_pending": _INT, "outbox_dropped": _INT}


@dataclasses.dataclass
class Metrics(_Record):
    """Inference metrics aggregated over one interval by the agent."""

    interval_s: float
    count: int
    errors: int = 0
    p50_latency_ms: float | None = None
    p95_latency_ms: float | None = None
    tokens_per_second: float | None = None
    mean_logprob: float | None = None
    prompt_tokens_mean: float | None = None
    prompt_tokens_max: int | None = None
    completion_tokens: int = 0
    version: str | None = None
    model: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    _types: ClassVar = {"interval_s": _NUM, "count": _INT, "errors": _INT, "p50_latency_ms": _NUM,
                        "p95_latency_ms": _NUM, "tokens_per_second": _NUM, "mean_logprob": _NUM,
                        "prompt_tokens_mean": _NUM, "prompt_tokens_max": _INT, "completion_tokens": _INT,
                        "version": _STR, "model": _STR}


@dataclasses.dataclass
class Event(_Record):
    """Something happened: ``update_started``, ``update_installed``, ``update_failed``,
    ``rolled_back``, ``outbox_overflow``, ... ``fields`` is free-form."""

    name: str
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    _types: ClassVar = {"name": _STR, "fields": (dict,)}


BODY_TYPES: dict[str, type[_Record]] = {
    "birth": Birth, "death": Death, "heartbeat": Heartbeat, "metrics": Metrics, "event": Event,
}


@dataclasses.dataclass
class Envelope(_Record):
    device: str
    kind: str
    seq: int
    ts: float
    body: dict[str, Any] = dataclasses.field(default_factory=dict)
    epoch: str = ""
    v: int = WIRE_VERSION
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    _types: ClassVar = {"device": _STR, "kind": _STR, "seq": _INT, "ts": _NUM, "body": (dict,), "v": _INT,
                        "epoch": _STR}

    @classmethod
    def from_dict(cls, d: Any) -> Envelope:
        env: Envelope = super().from_dict.__func__(cls, d)  # type: ignore[attr-defined]
        for k in ("device", "kind", "seq", "ts"):
            if getattr(env, k) is None:
                raise TelemetryError(f"Envelope.{k} is required")
        if env.v != WIRE_VERSION:
            raise TelemetryError(f"Envelope.v: unsupported wire version {env.v}")
        if not valid_id(env.device):
            raise TelemetryError(f"Envelope.device: invalid device id {env.device!r}")
        if env.kind not in KINDS:
            raise TelemetryError(f"Envelope.kind: unknown kind {env.kind!r}")
        if env.seq < 0:
            raise TelemetryError("Envelope.seq must be >= 0")
        if len(env.epoch) > 64:
            raise TelemetryError("Envelope.epoch is too long")
        return env

    def typed_body(self) -> _Record | dict[str, Any]:
        """The body as its typed record (raises TelemetryError if it does not fit the schema)."""
        t = BODY_TYPES.get(self.kind)
        return t.from_dict(self.body) if t else dict(self.body)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        if len(data) > MAX_PAYLOAD_BYTES:
            raise TelemetryError(f"payload of {len(data)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit")
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise TelemetryError(f"payload is not JSON ({e})") from e
        env = cls.from_dict(d)
        env.typed_body()
        return env


@dataclasses.dataclass
class Desired(_Record):
    """Desired state published (retained) by the server. The agent installs ``version`` of
    ``model`` through TUF. ``rollout`` names the rollout that asked for it; ``rollback`` is true
    when the server sends a device back to an older version (the agent refuses downgrades
    otherwise)."""

    model: str
    version: str
    rollout: str | None = None
    rollback: bool = False
    issued_at: float | None = None
    v: int = WIRE_VERSION
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    _types: ClassVar = {"model": _STR, "version": _STR, "rollout": _STR, "rollback": (bool,), "issued_at": _NUM}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Desired:
        if len(data) > MAX_PAYLOAD_BYTES:
            raise TelemetryError("desired-state payload too large")
        try:
            return cls.from_dict(json.loads(data))
        except (ValueError, UnicodeDecodeError) as e:
            raise TelemetryError(f"desired-state payload is not JSON ({e})") from e


@dataclasses.dataclass
class Command(_Record):
    id: str
    name: str
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    _types: ClassVar = {"id": _STR, "name": _STR, "args": (dict,)}


# --------------------------------------------------------------------------- broker settings


@dataclasses.dataclass
class MqttConfig(Record):
    """Where the broker is: ``mqtt://host:port`` or ``mqtts://host:port`` (TLS; with ``cert`` and
    ``key`` the client authenticates with a certificate signed by the fleet CA).

    The one MQTT settings type of both sides: the server's ingest and the agent's telemetry take it,
    and the agent's ``config.json`` stores it (unknown fields kept in ``extra``)."""

    url: str
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    error: ClassVar[type[Exception]] = TelemetryError

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise TelemetryError(f"MQTT URL {self.url!r} is not a string",
                                 hint="write it like mqtt://127.0.0.1:1883 or mqtts://broker:8883")
        for name in ("ca", "cert", "key"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise TelemetryError(f"MQTT setting {name!r} must be a file path",
                                     hint="give the path of a PEM file")

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme in ("mqtts", "ssl", "tls") or self.ca is not None

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        u = urlparse(self.url)
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl", "tls"):
            raise TelemetryError(f"MQTT URL {self.url!r}: scheme must be mqtt:// or mqtts://",
                                 hint="write it like mqtt://127.0.0.1:1883 or mqtts://broker:8883")
        return u.port or (8883 if self.tls else 1883)

    def apply_tls(self, client: Any) -> None:
        """Configure TLS on a paho client (no-op for plain mqtt://)."""
        if not self.tls:
            return
        import ssl

        ctx = ssl.create_default_context(cafile=self.ca) if self.ca else ssl.create_default_context()
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        client.tls_set_context(ctx)

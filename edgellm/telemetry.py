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

Every field is checked at the boundary (:class:`Field`): JSON type, integers within signed 64 bits
(counts tighter, so sums stay in range), finite numbers only (:func:`loads` refuses ``NaN``,
``Infinity`` and ``1e309``), strings bounded and printable, ids by :mod:`edgellm.ids`. ``ts`` is the
device's clock and is only displayed: the server orders by ``(epoch, seq)`` and its receive time.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any, ClassVar
from urllib.parse import urlparse

from edgellm._record import Record, field_names, required_fields
from edgellm.errors import EdgeLLMError
from edgellm.ids import ID_RE, ID_RULE
from edgellm.ids import valid_id as valid_id  # the one id rule, re-exported for wire users

WIRE_VERSION = 1
PREFIX = f"edgellm/v{WIRE_VERSION}"
SHARE_GROUP = "edgellm"
MAX_PAYLOAD_BYTES = 64 * 1024
KINDS = ("birth", "death", "heartbeat", "metrics", "event", "reply")
UNSEQUENCED = ("birth", "death")  # connection state: seq 0, ordered by the server's receive time
INT64_MAX = 2**63 - 1
#: counts inside one metrics interval; small enough that sums over many rows stay in 64 bits
COUNT_MAX = 2**31 - 1
#: latencies, rates, durations: finite and far beyond anything real
REAL_MAX = 1e12
LABEL_MAX = 128


class TelemetryError(EdgeLLMError):
    """A telemetry message or MQTT setting is malformed. ``reason`` says which check refused it:
    ``oversized`` (over :data:`MAX_PAYLOAD_BYTES`), ``json`` (not strict JSON) or ``schema``."""

    def __init__(self, message: str, *, hint: str | None = None, reason: str = "schema") -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


class WireName(str, enum.Enum):
    """A name that travels (on the wire, in the API): its members compare equal to, format as
    and serialise to their one spelling."""

    def __str__(self) -> str:
        return str(self.value)


class EventName(WireName):
    """Event names a device sends that the server acts upon (one spelling each). Other names
    are stored and shown as they come."""

    UPDATE_STARTED = "update.started"
    UPDATE_INSTALLED = "update.installed"
    UPDATE_HEALTH_CHECK = "update.health_check"
    UPDATE_COMMITTED = "update.committed"
    UPDATE_FAILED = "update.failed"
    UPDATE_REFUSED = "update.refused"
    UPDATE_ROLLED_BACK = "update.rolled_back"
    #: an adapter an assignment names was already installed: it serves for that assignment's serial
    ADAPTER_ACTIVE = "adapter.active"
    OUTBOX_OVERFLOW = "outbox_overflow"


#: events that mean a device could not take (or keep) the version it was sent
UPDATE_FAILURES = frozenset({EventName.UPDATE_FAILED, EventName.UPDATE_REFUSED, EventName.UPDATE_ROLLED_BACK})


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


# --------------------------------------------------------------------------- strict JSON


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:40]} overflows a 64-bit float")
    return v


#: one decoder for every message (``json.loads`` with hooks builds a new one per call)
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def loads(data: bytes | str, what: str = "payload") -> Any:
    """Strict JSON: NaN, Infinity and numbers that overflow to infinity are refused, as is
    nesting too deep to parse. Raises :class:`TelemetryError` with ``reason="json"``.
    Takes what ``json.loads`` takes (UTF-8/16/32 bytes; text without a BOM)."""
    try:
        if isinstance(data, str):
            if data.startswith("\ufeff"):
                raise ValueError("unexpected UTF-8 BOM")
        else:
            data = data.decode(json.detect_encoding(data), "surrogatepass")
        return _DECODER.decode(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise TelemetryError(f"{what} is not JSON ({str(e)[:200]})", reason="json") from e


def dumps(obj: Any) -> bytes:
    """Compact, sorted JSON; refuses NaN and infinities rather than writing them."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


# --------------------------------------------------------------------------- field checks


@dataclasses.dataclass(frozen=True)
class Field:
    """What one wire field may hold: its JSON type and bounds. ``None`` passes here; the record
    refuses it for fields without a default."""

    kind: type
    lo: float = 0
    hi: float = INT64_MAX
    max_len: int = LABEL_MAX
    rule: str | None = None  # "id": the one id rule

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", _quick_check(self))

    def ok(self, v: Any) -> bool:  # replaced per instance by __post_init__
        """True when ``v`` (not None) certainly passes :meth:`check`: the common case in one
        call; False means "run :meth:`check`", which raises or, for unusual types, passes."""
        return False

    def check(self, owner: str, name: str, v: Any) -> None:
        where = f"{owner}.{name}"
        if v is None:
            return
        if self.kind is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif self.kind is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        else:
            ok = isinstance(v, self.kind)
        if not ok:
            raise TelemetryError(f"{where}: expected {self.kind.__name__}, got {type(v).__name__}")
        if self.kind in (int, float) and not (self.lo <= v <= self.hi):  # also refuses NaN
            lo, hi = (int(self.lo), int(self.hi)) if self.kind is int else (self.lo, self.hi)
            raise TelemetryError(f"{where}: {str(v)[:40]} is outside [{lo}, {hi}]")
        if self.kind is str:
            if len(v) > self.max_len:
                raise TelemetryError(f"{where}: longer than {self.max_len} characters")
            if self.rule == "id" and not valid_id(v):
                raise TelemetryError(f"{where}: {v[:40]!r} is not an id ({ID_RULE})")
            if not v.isprintable():
                raise TelemetryError(f"{where}: control characters are not allowed")


def _quick_check(f: Field) -> Any:
    """The plain-JSON-types subset of ``f.check`` as one predicate (exact types only: a ``bool``
    or an ``int`` subclass goes through the full check)."""
    lo, hi, n = f.lo, f.hi, f.max_len
    if f.kind is int:
        return lambda v: type(v) is int and lo <= v <= hi
    if f.kind is float:
        return lambda v: (type(v) is float or type(v) is int) and lo <= v <= hi
    if f.kind is str and f.rule == "id":
        return lambda v: type(v) is str and len(v) <= n and ID_RE.fullmatch(v) is not None
    if f.kind is str:
        return lambda v: type(v) is str and len(v) <= n and v.isprintable()
    kind = f.kind
    return lambda v: type(v) is kind


SEQ = Field(int, 0, INT64_MAX)
COUNT = Field(int, 0, COUNT_MAX)
BIG_COUNT = Field(int, 0, INT64_MAX)
REAL = Field(float, 0, REAL_MAX)
SIGNED_REAL = Field(float, -REAL_MAX, REAL_MAX)
TEXT = Field(str)
ID = Field(str, rule="id")
SHORT = Field(str, max_len=64)
OBJECT = Field(dict)
FLAG = Field(bool)


class _Record(Record):
    """Wire records: unknown fields kept in ``extra``; every known field type- and range-checked."""

    error = TelemetryError
    _fields: ClassVar[dict[str, Field]] = {}

    @classmethod
    def from_dict(cls, d: Any) -> Any:
        if not isinstance(d, dict):
            raise TelemetryError(f"{cls.__name__}: expected an object, got {type(d).__name__}")
        names, required, fields = field_names(cls), required_fields(cls), cls._fields
        known: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in d.items():  # split and check in one pass (thousands of messages a second)
            if k not in names:
                extra[k] = v
                continue
            known[k] = v
            if v is None:
                if k in required:
                    raise TelemetryError(f"{cls.__name__}.{k} is required")
                continue
            spec = fields.get(k)
            if spec is not None and not spec.ok(v):
                spec.check(cls.__name__, k, v)
        return cls.build(known, extra)


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
    _fields: ClassVar = {
        "session": SHORT,
        "profile": TEXT,
        "group": ID,
        "version": TEXT,
        "model": TEXT,
        "slot": SHORT,
        "health": SHORT,
        "agent_version": SHORT,
    }


@dataclasses.dataclass
class Death(_Record):
    """The last will (``reason="lost"``) or a clean goodbye (``reason="stop"``)."""

    session: str
    reason: str = "lost"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    _fields: ClassVar = {"session": SHORT, "reason": SHORT}


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
    _fields: ClassVar = {
        "uptime_s": REAL,
        "version": TEXT,
        "model": TEXT,
        "slot": SHORT,
        "health": SHORT,
        "profile": TEXT,
        "group": ID,
        "outbox_pending": BIG_COUNT,
        "outbox_dropped": BIG_COUNT,
    }


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
    _fields: ClassVar = {
        "interval_s": REAL,
        "count": COUNT,
        "errors": COUNT,
        "p50_latency_ms": REAL,
        "p95_latency_ms": REAL,
        "tokens_per_second": REAL,
        "mean_logprob": SIGNED_REAL,
        "prompt_tokens_mean": REAL,
        "prompt_tokens_max": COUNT,
        "completion_tokens": BIG_COUNT,
        "version": TEXT,
        "model": TEXT,
    }


@dataclasses.dataclass
class Event(_Record):
    """Something happened: see :class:`EventName` for the names the server acts upon.
    ``fields`` is free-form (strict JSON, inside the payload bound)."""

    name: str
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    _fields: ClassVar = {"name": TEXT, "fields": OBJECT}


BODY_TYPES: dict[str, type[_Record]] = {
    "birth": Birth,
    "death": Death,
    "heartbeat": Heartbeat,
    "metrics": Metrics,
    "event": Event,
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
    # ts is the device's clock: kept for display, never used to order what the server keeps
    _fields: ClassVar = {
        "device": ID,
        "kind": SHORT,
        "seq": SEQ,
        "ts": REAL,
        "body": OBJECT,
        "v": Field(int, 0, 1000),
        "epoch": SHORT,
    }

    @classmethod
    def from_dict(cls, d: Any) -> Envelope:
        env: Envelope = super().from_dict.__func__(cls, d)  # type: ignore[attr-defined]  # the base classmethod, bound to this class
        for k in ("device", "kind", "seq", "ts"):
            if getattr(env, k) is None:
                raise TelemetryError(f"Envelope.{k} is required")
        if env.v != WIRE_VERSION:
            raise TelemetryError(f"Envelope.v: unsupported wire version {env.v}")
        if env.kind not in KINDS:
            raise TelemetryError(f"Envelope.kind: unknown kind {env.kind!r}")
        if (env.seq == 0) != (env.kind in UNSEQUENCED):
            raise TelemetryError(
                f"Envelope.seq: {env.kind} messages carry "
                f"{'seq 0' if env.kind in UNSEQUENCED else 'a sequence number >= 1'}"
            )
        return env

    def typed_body(self) -> _Record | dict[str, Any]:
        """The body as its typed record (raises TelemetryError if it does not fit the schema).
        Checked once per body object: ingest validates it and the store reads it again."""
        cached = self.__dict__.get("_typed")
        if cached is not None and cached[0] is self.body:
            return cached[1]
        t = BODY_TYPES.get(self.kind)
        rec = t.from_dict(self.body) if t else dict(self.body)
        self.__dict__["_typed"] = (self.body, rec)
        return rec

    def to_json(self) -> bytes:
        return dumps(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        if len(data) > MAX_PAYLOAD_BYTES:
            raise TelemetryError(
                f"payload of {len(data)} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit", reason="oversized"
            )
        env = cls.from_dict(loads(data))
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
    _fields: ClassVar = {"model": TEXT, "version": TEXT, "rollout": SHORT, "rollback": FLAG, "issued_at": REAL}

    def to_json(self) -> bytes:
        return dumps(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes) -> Desired:
        if len(data) > MAX_PAYLOAD_BYTES:
            raise TelemetryError("desired-state payload too large", reason="oversized")
        return cls.from_dict(loads(data, "desired-state payload"))


@dataclasses.dataclass
class Command(_Record):
    id: str
    name: str
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    _fields: ClassVar = {"id": SHORT, "name": TEXT, "args": OBJECT}


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
            raise TelemetryError(
                f"MQTT URL {self.url!r} is not a string",
                hint="write it like mqtt://127.0.0.1:1883 or mqtts://broker:8883",
            )
        for name in ("ca", "cert", "key"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise TelemetryError(f"MQTT setting {name!r} must be a file path", hint="give the path of a PEM file")

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
            raise TelemetryError(
                f"MQTT URL {self.url!r}: scheme must be mqtt:// or mqtts://",
                hint="write it like mqtt://127.0.0.1:1883 or mqtts://broker:8883",
            )
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

"""The agent's on-disk layout and its configuration (``DIR/config.json``).

Layout of the data dir::

    config.json        AgentConfig (written by `provision`)
    api-token          bearer token of the local API's inference routes (0600)
    admin-token        bearer token of its admin routes (0600; the inference token is not one)
    keys/              device key pair (device.key 0600, device.pub, device.csr)
    trust/root.json    pinned TUF root (0444, never written by the agent after provisioning)
    trust/cache/       writable TUF metadata cache (never trusted on its own)
    state.json         the slot pointer: current slot, trial, last result (atomic writes)
    slots/A, slots/B   the two model slots; slots/staging is scratch space
    downloads/         scratch space for downloads and envelopes
    run/agent.json     pid, port and socket of a running daemon
    logs/audit.jsonl   one JSON line per API request
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from agent._fs import atomic_write_json, read_json
from agent.errors import ConfigError, NotProvisionedError
from edgellm._record import Record
from edgellm.durations import HINT as DURATION_HINT
from edgellm.durations import parse_seconds
from edgellm.errors import EdgeLLMError
from edgellm.telemetry import MqttConfig

DEFAULT_DATA_DIR = "/var/lib/edgellm-agent"
DEFAULT_PORT = 8321


def default_data_dir() -> Path:
    return Path(os.environ.get("EDGELLM_AGENT_DIR") or DEFAULT_DATA_DIR)


class AgentPaths:
    def __init__(self, data_dir: str | Path) -> None:
        self.root = Path(data_dir).absolute()

    config = property(lambda s: s.root / "config.json")
    token = property(lambda s: s.root / "api-token")
    admin_token = property(lambda s: s.root / "admin-token")
    keys = property(lambda s: s.root / "keys")
    trust = property(lambda s: s.root / "trust")
    trust_root = property(lambda s: s.root / "trust" / "root.json")
    tuf_cache = property(lambda s: s.root / "trust" / "cache")
    state = property(lambda s: s.root / "state.json")
    slots = property(lambda s: s.root / "slots")
    staging = property(lambda s: s.root / "slots" / "staging")
    downloads = property(lambda s: s.root / "downloads")
    run = property(lambda s: s.root / "run")
    run_info = property(lambda s: s.root / "run" / "agent.json")
    logs = property(lambda s: s.root / "logs")
    audit_log = property(lambda s: s.root / "logs" / "audit.jsonl")
    lock = property(lambda s: s.root / ".install.lock")

    def slot_dir(self, slot: str) -> Path:
        return self.slots / slot

    def ensure_dirs(self) -> None:
        for d in (self.root, self.slots, self.downloads, self.run, self.logs, self.tuf_cache):
            d.mkdir(parents=True, exist_ok=True)


def _seconds(owner: object, names: tuple[str, ...]) -> None:
    """Duration fields accept seconds or a duration string ("30s", "1h", "250ms": edgellm.durations)."""
    for name in names:
        value = getattr(owner, name)
        try:
            setattr(owner, name, parse_seconds(value))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json: {name}: {e}", hint=DURATION_HINT) from None


@dataclasses.dataclass
class Limits(Record):
    """Bounds of the local API. Every request is bounded in bytes, tokens, queueing and time."""

    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 65536
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    default_max_tokens: int = 128
    queue_size: int = 8
    max_connections: int = 128  # open connections of all clients; also requests running at once
    max_connections_per_client: int = 64  # per peer address (TCP) or peer uid (Unix socket)
    header_timeout_s: float = 10.0  # a request's headers must arrive within this
    body_timeout_s: float = 30.0  # ... and its body within this
    max_header_bytes: int = 16 * 1024
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _seconds(self, ("header_timeout_s", "body_timeout_s"))


@dataclasses.dataclass
class AgentConfig(Record):
    device_id: str
    profile: str
    server: str | None = None
    group: str = "default"
    mqtt: MqttConfig | None = None
    listen: str | None = f"127.0.0.1:{DEFAULT_PORT}"
    socket: str | None = None
    threads: int | None = None  # None: the bundle manifest's (per profile), capped at the usable CPUs
    update_interval_s: float = 3600.0
    max_boot_attempts: int = 3  # daemon starts allowed before an uncommitted trial reverts
    trial_commit_s: float = 60.0  # a new slot commits after serving this long
    health_timeout_s: float = 300.0
    audit_prompts: bool = False  # write prompt text into the audit log
    download_max_bytes: int = 8 << 30
    limits: Limits = dataclasses.field(default_factory=Limits)
    train_data: str | None = None  # local text this device may learn from (federated fine-tuning)
    train_max_bytes: int = 64 << 20  # a larger training directory is declined, not read
    learn_from_use: bool = False  # keep the user's messages (capped) as training text
    learn_max_bytes: int = 1 << 20
    fl_timeout_s: float = 6 * 3600.0  # a federated run's SuperNode is stopped after this long
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _seconds(self, ("update_interval_s", "trial_commit_s", "health_timeout_s"))
        if self.threads is not None and (type(self.threads) is not int or not 1 <= self.threads <= 256):
            raise ConfigError(
                f"config.json: threads must be null or an integer in 1..256, got {self.threads!r}",
                hint="set threads to null (the bundle's setting) or re-provision with --threads N",
            )

    @classmethod
    def from_dict(cls, d: dict) -> AgentConfig:
        d = dict(d)
        try:
            if d.get("mqtt") is not None:
                d["mqtt"] = MqttConfig.from_dict(d["mqtt"])
            d["limits"] = Limits.from_dict(d.get("limits") or {})
        except EdgeLLMError as e:
            raise ConfigError(f"config.json: {e.args[0]}", hint=e.hint) from None
        except ValueError as e:
            raise ConfigError(f"config.json: {e}", hint="fix the field or re-provision") from None
        return super().from_dict(d)

    @classmethod
    def load(cls, paths: AgentPaths) -> AgentConfig:
        if not paths.config.exists():
            raise NotProvisionedError(
                f"{paths.root} is not a provisioned agent data dir (no config.json)",
                hint=f"run `edgellm-agent provision --data-dir {paths.root} --device-id ID --profile NAME "
                "--server URL --root root.json` first, or pass the right --data-dir",
            )
        return cls.from_dict(read_json(paths.config))

    def save(self, paths: AgentPaths) -> None:
        atomic_write_json(paths.config, self.to_dict(), mode=0o640)

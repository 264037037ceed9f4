"""What a device may train on, and whether it takes part: torch-free checks both the invitation
handler (in the daemon) and the ClientApp (in Flower's process) run.

    base = training_base(paths, base_sha256)        # the verified GGUF of the current slot
    data = local_data(paths, config)                # the device's text, split and hashed
    check_profile(config, base)                     # enough memory to train on this base

Each refusal is a :class:`Decline` with one of the reason codes the server understands
(:data:`REASONS`). Raw text is read here and handed to the trainer; it is never logged and never
part of anything sent: only ``data_sha256`` (a hash of the documents as used) leaves the device.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from agent.config import AgentConfig, AgentPaths
from agent.errors import AgentError, SlotIntegrityError

log = logging.getLogger(__name__)

NO_TRAIN_DATA = "no-train-data"
PROFILE_CANNOT_TRAIN = "profile-cannot-train"
RUNTIME_ONNX = "runtime-onnx"
BASE_MISMATCH = "base-mismatch"
BUSY = "busy"
NO_MODEL = "no-model"
BAD_REQUEST = "bad-request"
FAILED = "failed"
REASONS = (NO_TRAIN_DATA, PROFILE_CANNOT_TRAIN, RUNTIME_ONNX, BASE_MISMATCH, BUSY, NO_MODEL, BAD_REQUEST, FAILED)

#: bytes per parameter of a served GGUF, by quantization (to estimate the float32 training copy)
_BYTES_PER_PARAM = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 1.0625,
    "q6_k": 0.82,
    "q5_k_m": 0.69,
    "q4_k_m": 0.57,
    "q4_0": 0.5625,
}
_TRAIN_OVERHEAD = 512 << 20  # the ClientApp process: Python + torch measured at ~450 MB RSS


def valid_sha256(value: object) -> bool:
    """64 lowercase hex digits (how the fleet names an artifact)."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


class Decline(AgentError):
    """This device does not take part; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class TrainingBase:
    """The current slot's model, as verified against its manifest."""

    slot: str
    version: str
    artifact: Path
    sha256: str
    size: int
    quantization: str
    tokenizer: Path | None


@dataclasses.dataclass(frozen=True)
class LocalData:
    train: list[str]
    heldout: list[str]
    sha256: str
    n_bytes: int

    def __repr__(self) -> str:  # never print the text itself
        return f"LocalData(train={len(self.train)} docs, heldout={len(self.heldout)} docs, sha256={self.sha256[:12]})"


def training_base(paths: AgentPaths, base_sha256: str | None = None, *, deep: bool = True) -> TrainingBase:
    """The GGUF the device serves, after its slot verified; declines ONNX and other bases."""
    from agent.slots import SlotStore

    store = SlotStore(paths)
    state = store.load()
    rec = state.current_record
    if rec is None or state.current is None:
        raise Decline(NO_MODEL, "no model is installed", hint="install a GGUF bundle before joining a federated run")
    if rec.runtime != "gguf":
        raise Decline(
            RUNTIME_ONNX if rec.runtime == "onnx" else PROFILE_CANNOT_TRAIN,
            f"the current model runs on {rec.runtime}; only GGUF models can be fine-tuned here",
            hint="install a GGUF build of the model to take part",
        )
    try:
        manifest = store.verify(state, state.current, deep=deep)
    except SlotIntegrityError as e:
        raise Decline(NO_MODEL, f"the current slot does not verify: {e}", hint=e.hint) from e
    artifact = manifest.artifact
    entry = manifest.file(artifact)
    if base_sha256 is not None and entry.sha256 != base_sha256:
        raise Decline(
            BASE_MISMATCH,
            f"this device runs {rec.version} ({entry.sha256[:12]}), the run trains on {base_sha256[:12]}",
            hint="update the device to the run's base first",
        )
    slot_dir = paths.slot_dir(state.current)
    tok_name = manifest.tokenizer
    tokenizer = slot_dir / tok_name if tok_name and (slot_dir / tok_name).is_file() else None
    return TrainingBase(
        slot=state.current,
        version=rec.version,
        artifact=slot_dir / artifact,
        sha256=entry.sha256,
        size=int(entry.size),
        quantization=str(rec.quantization or manifest.quantization or "").lower(),
        tokenizer=tokenizer,
    )


def data_sources(paths: AgentPaths, config: AgentConfig) -> list[Path]:
    """The ``--train-data`` dir and, with ``--learn-from-use``, the kept messages; declines if none."""
    sources: list[Path] = []
    if config.train_data:
        d = Path(config.train_data)
        if not d.is_dir():  # the path stays in this device's log: a decline's text is sent to the server
            log.warning("the training data directory %s does not exist", d)
            raise Decline(
                NO_TRAIN_DATA,
                "the training data directory (--train-data) does not exist",
                hint="create it or re-provision with another --train-data DIR",
            )
        sources.append(d)
    learned = learned_path(paths)
    if config.learn_from_use and learned.is_file() and learned.stat().st_size:
        sources.append(learned)
    if not sources:
        raise Decline(
            NO_TRAIN_DATA,
            "this device has no local training data",
            hint="provision it with `--train-data DIR` (or `--learn-from-use`) to let it learn locally",
        )
    return sources


def learned_path(paths: AgentPaths) -> Path:
    """Where `--learn-from-use` keeps the user's messages (JSONL, ``text`` field, capped)."""
    return paths.root / "learn" / "messages.jsonl"


def _dir_bytes(d: Path, cap: int) -> int:
    total = 0
    for root, _dirs, files in os.walk(d):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                continue
            if total > cap:
                return total
    return total


def local_data(paths: AgentPaths, config: AgentConfig, *, heldout_fraction: float = 0.2) -> LocalData:
    """The device's local text (``--train-data`` dir, plus learned-from-use text when enabled),
    split into train and held-out parts by content, and hashed."""
    from edgellm.errors import BuildError
    from edgellm.pipeline.data import load_dataset

    sources = data_sources(paths, config)
    n_bytes = sum(_dir_bytes(s, config.train_max_bytes) if s.is_dir() else s.stat().st_size for s in sources)
    if n_bytes > config.train_max_bytes:
        raise Decline(
            NO_TRAIN_DATA,
            f"local training data is over {config.train_max_bytes} bytes",
            hint="keep less text in the training directory or raise train_max_bytes in config.json",
        )
    try:
        ds = load_dataset(sources, val_fraction=heldout_fraction)
    except BuildError as e:  # no text files, empty, not UTF-8, fewer than 2 documents
        raise Decline(NO_TRAIN_DATA, f"local training data is not usable: {e.args[0]}", hint=e.hint) from e
    return LocalData(train=ds.train, heldout=ds.val, sha256=ds.sha256, n_bytes=n_bytes)


def check_profile(config: AgentConfig, base: TrainingBase) -> None:
    """Decline when the profile cannot hold a float32 copy of the base besides the served model.

    Measured loading a 29.4M-parameter GGUF: about 4 bytes per parameter plus the mapped file;
    training adds the activations and the adapters' optimizer state (a quarter more here)."""
    from edgellm.errors import ProfileError
    from edgellm.profiles import get_profile

    try:
        profile = get_profile(config.profile)
    except ProfileError as e:
        raise Decline(PROFILE_CANNOT_TRAIN, f"unknown profile {config.profile!r}", hint=e.hint) from e
    if profile.device_class == "mcu" or not profile.can_run_llm:
        raise Decline(
            PROFILE_CANNOT_TRAIN,
            f"profile {profile.name} cannot train models",
            hint="only devices that run a GGUF model can take part",
        )
    params = base.size / _BYTES_PER_PARAM.get(base.quantization, 0.5)
    need = 2 * base.size + int(5 * params) + _TRAIN_OVERHEAD  # served + mapped file, float32 copy
    if need > profile.usable_ram_bytes:
        raise Decline(
            PROFILE_CANNOT_TRAIN,
            f"training on this model needs about {need >> 20} MiB, "
            f"profile {profile.name} allows {profile.usable_ram_bytes >> 20} MiB",
            hint="federated fine-tuning needs a smaller model or a device with more memory",
        )


def check_can_train(
    paths: AgentPaths, config: AgentConfig, base_sha256: str | None, *, deep: bool = True
) -> TrainingBase:
    """Every check of an invitation, in the order a device reports them (without reading the text)."""
    base = training_base(paths, base_sha256, deep=deep)
    data_sources(paths, config)
    check_profile(config, base)
    return base

"""Hardware profiles: one TOML file per device class, loaded into a typed, validated ``Profile``.

A profile says what a device can hold and how fast it can stream weights: RAM and the share of it
the model may use, sustained memory bandwidth, CPU cores and the ISA features that matter for
quantized kernels, accelerators, the runtimes installed, and the latency/throughput target the
build must meet. Every figure comes with ``sources``.

Units: ``ram_gb`` is in GiB (``ram_bytes = ram_gb * 1024**3``); ``bandwidth_gbps`` is in GB/s
(10**9 bytes per second), sustained (measured-class, e.g. STREAM copy), not the bus peak.

Any missing or nonsensical field raises :class:`~edgellm.errors.ProfileError` whose message names
the file and the field (``hardware_profiles/x.toml: memory.ram_gb: must be > 0, got -1``). Unknown
keys are refused too: a typo must never silently fall back to a default.

The file format is described in ``docs/profiles.md``. Describing the machine this runs on
(``edgellm profiles detect``) is :mod:`edgellm.hardware`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm._toml import dumps_toml
from edgellm.errors import ProfileError
from edgellm.formats import KNOWN_RUNTIME_NAMES

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
GIB = 1024**3

DEVICE_CLASSES = frozenset({"sbc", "jetson", "mini-pc", "laptop", "server", "mcu"})
ARCHES = frozenset({"aarch64", "armv7l", "x86_64", "riscv64", "xtensa"})
#: instruction-set extensions a profile may name, in the order profiles are written
_ISA_ORDER = [
    "neon",
    "dotprod",
    "i8mm",
    "sve",
    "sve2",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512_vnni",
]
KNOWN_ISA = frozenset(_ISA_ORDER)
KNOWN_RUNTIMES = KNOWN_RUNTIME_NAMES
ACCELERATOR_KINDS = frozenset({"gpu", "npu", "dsp"})
SOURCE_SCHEMES = ("https://", "http://", "file://")
PROFILES_ENV = "EDGELLM_PROFILES_DIR"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_SCHEMA_HINT = "see docs/profiles.md for the profile schema"


# --------------------------------------------------------------------------- validation helpers


class _Fields:
    """Reads typed fields from one TOML table, remembering which keys were used.

    Every problem is raised as ``ProfileError("<file>: <table.key>: <problem>")``.
    """

    def __init__(self, data: Any, file: str, prefix: str = "") -> None:
        self.file = file
        self.prefix = prefix
        if not isinstance(data, dict):
            self.fail(None, f"must be a table, got {_type_name(data)}")
        self.data: dict = data
        self.used: set[str] = set()

    def where(self, key: str | None) -> str:
        if key is None:
            return self.prefix or "<top level>"
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str | None, problem: str, hint: str = _SCHEMA_HINT) -> None:
        raise ProfileError(f"{self.file}: {self.where(key)}: {problem}", hint=hint)

    def raw(self, key: str) -> Any:
        self.used.add(key)
        if key not in self.data:
            self.fail(key, "missing required field")
        return self.data[key]

    def table(self, key: str) -> _Fields:
        return _Fields(self.raw(key), self.file, self.where(key))

    def string(self, key: str, pattern: re.Pattern[str] | None = None, choices: Iterable[str] | None = None) -> str:
        v = self.raw(key)
        if not isinstance(v, str) or not v.strip():
            self.fail(key, f"must be a non-empty string, got {_show(v)}")
        if pattern is not None and not pattern.match(v):
            self.fail(key, f"must match {pattern.pattern}, got {v!r}")
        if choices is not None and v not in choices:
            self.fail(key, f"must be one of {sorted(choices)}, got {v!r}")
        return v

    def integer(self, key: str, minimum: int = 1) -> int:
        v = self.raw(key)
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"must be an integer, got {_show(v)}")
        if v < minimum:
            self.fail(key, f"must be >= {minimum}, got {v}")
        return v

    def number(self, key: str, *, gt: float = 0.0, le: float | None = None) -> float:
        v = self.raw(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(key, f"must be a number, got {_show(v)}")
        v = float(v)
        if not math.isfinite(v):
            self.fail(key, f"must be finite, got {v}")
        if v <= gt:
            self.fail(key, f"must be > {_num(gt)}, got {_num(v)}")
        if le is not None and v > le:
            self.fail(key, f"must be <= {_num(le)}, got {_num(v)}")
        return v

    def string_list(self, key: str, choices: Iterable[str] | None = None, allow_empty: bool = True) -> list[str]:
        v = self.raw(key)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            self.fail(key, f"must be a list of strings, got {_show(v)}")
        if not allow_empty and not v:
            self.fail(key, "must not be empty")
        if len(set(v)) != len(v):
            self.fail(key, f"has duplicate entries: {v}")
        if choices is not None:
            unknown = [x for x in v if x not in choices]
            if unknown:
                self.fail(key, f"unknown value(s) {unknown}; known: {sorted(choices)}")
        return v

    def done(self) -> None:
        extra = sorted(set(self.data) - self.used)
        if extra:
            where = self.where(extra[0])
            self.fail(
                None,
                f"unknown field(s) {extra} (first: {where})",
                hint=f"check the spelling; known fields here: {sorted(self.used)}; {_SCHEMA_HINT}",
            )


def _type_name(v: Any) -> str:
    return {
        dict: "a table",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    return f"{_type_name(v)} {v!r}" if not isinstance(v, dict) else "a table"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


# --------------------------------------------------------------------------- the typed profile


@dataclass(frozen=True)
class Accelerator:
    kind: str  # gpu | npu | dsp
    name: str
    tops_int8: float  # vendor-stated peak INT8 TOPS (dense or sparse as the vendor states it)

    @classmethod
    def from_dict(cls, data: Any, file: str = "<dict>", where: str = "accelerators[0]") -> Accelerator:
        f = _Fields(data, file, where)
        acc = cls(
            kind=f.string("kind", choices=ACCELERATOR_KINDS), name=f.string("name"), tops_int8=f.number("tops_int8")
        )
        f.done()
        return acc

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "tops_int8": self.tops_int8}


@dataclass(frozen=True)
class Profile:
    """One device class. Build with :meth:`from_dict` / :func:`load_profile`; it is validated there."""

    name: str
    display_name: str
    device_class: str
    arch: str
    ram_bytes: int
    model_share: float
    bandwidth_gbps: float
    cpu_model: str
    cores: int
    freq_ghz: float
    isa: frozenset[str]
    accelerators: tuple[Accelerator, ...]
    runtimes: frozenset[str]
    threads: int
    min_tokens_per_second: float
    max_first_token_ms: int
    context_length: int
    power_budget_w: float
    sources: tuple[str, ...]
    path: Path | None = field(default=None, compare=False)

    @property
    def ram_gb(self) -> float:
        """RAM in GiB, as written in the file."""
        return self.ram_bytes / GIB

    @property
    def usable_ram_bytes(self) -> int:
        """Bytes the model (weights + KV cache + runtime buffers) may use on this device."""
        return int(self.ram_bytes * self.model_share)

    @property
    def can_run_llm(self) -> bool:
        """False when no supported runtime is available (e.g. a microcontroller)."""
        return bool(self.runtimes)

    @classmethod
    def from_dict(cls, data: Any, *, file: str | os.PathLike[str] = "<dict>", path: Path | None = None) -> Profile:
        """Validate the TOML structure and build a Profile. ``file`` is used in error messages."""
        file = str(file)
        top = _Fields(data, file)
        version = top.integer("schema_version")
        if version != SCHEMA_VERSION:
            top.fail(
                "schema_version",
                f"unsupported version {version}; this edgellm reads {SCHEMA_VERSION}",
                hint="upgrade edgellm or rewrite the profile for this schema version",
            )
        name = top.string("name", pattern=_NAME_RE)
        if path is not None and name != path.stem:
            top.fail(
                "name",
                f"must equal the file name stem {path.stem!r}, got {name!r}",
                hint=f'rename the file to {name}.toml or set name = "{path.stem}"',
            )
        display_name = top.string("display_name")
        device_class = top.string("device_class", choices=DEVICE_CLASSES)
        arch = top.string("arch", choices=ARCHES)
        sources = top.string_list("sources", allow_empty=False)
        for i, s in enumerate(sources):
            if not s.startswith(SOURCE_SCHEMES) or len(s) <= len(s.split("//", 1)[0]) + 3:
                top.fail(
                    f"sources[{i}]",
                    f"must be a URL ({', '.join(SOURCE_SCHEMES)}), got {s!r}",
                    hint="cite the vendor spec page, datasheet or benchmark the figures come from",
                )

        mem = top.table("memory")
        ram_gb = mem.number("ram_gb")
        model_share = mem.number("model_share", le=1.0)
        bandwidth = mem.number("bandwidth_gbps")
        mem.done()

        cpu = top.table("cpu")
        cpu_model = cpu.string("model")
        cores = cpu.integer("cores")
        freq = cpu.number("freq_ghz")
        isa = cpu.string_list("isa", choices=KNOWN_ISA)
        cpu.done()

        accs: list[Accelerator] = []
        if "accelerators" in top.data:
            raw = top.raw("accelerators")
            if not isinstance(raw, list):
                top.fail("accelerators", f"must be an array of tables ([[accelerators]]), got {_show(raw)}")
            accs = [Accelerator.from_dict(a, file, f"accelerators[{i}]") for i, a in enumerate(raw)]

        rt = top.table("runtimes")
        runtimes = rt.string_list("available", choices=KNOWN_RUNTIMES)
        threads = rt.integer("threads")
        rt.done()
        if threads > cores:
            rt.fail("threads", f"must be <= cpu.cores ({cores}), got {threads}")

        tg = top.table("targets")
        min_tps = tg.number("min_tokens_per_second")
        max_ftl = tg.integer("max_first_token_ms")
        ctx = tg.integer("context_length")
        tg.done()

        pw = top.table("power")
        budget = pw.number("budget_w")
        pw.done()
        top.done()

        return cls(
            name=name,
            display_name=display_name,
            device_class=device_class,
            arch=arch,
            ram_bytes=int(round(ram_gb * GIB)),
            model_share=model_share,
            bandwidth_gbps=bandwidth,
            cpu_model=cpu_model,
            cores=cores,
            freq_ghz=freq,
            isa=frozenset(isa),
            accelerators=tuple(accs),
            runtimes=frozenset(runtimes),
            threads=threads,
            min_tokens_per_second=min_tps,
            max_first_token_ms=max_ftl,
            context_length=ctx,
            power_budget_w=budget,
            sources=tuple(sources),
            path=path,
        )

    def to_dict(self) -> dict[str, Any]:
        """The TOML structure (what :meth:`from_dict` reads). Lists are sorted for stable output."""
        d: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "display_name": self.display_name,
            "device_class": self.device_class,
            "arch": self.arch,
            "sources": list(self.sources),
            "memory": {
                "ram_gb": _ram_gb(self.ram_bytes),
                "model_share": self.model_share,
                "bandwidth_gbps": self.bandwidth_gbps,
            },
            "cpu": {
                "model": self.cpu_model,
                "cores": self.cores,
                "freq_ghz": self.freq_ghz,
                "isa": _ordered(self.isa, _ISA_ORDER),
            },
        }
        if self.accelerators:
            d["accelerators"] = [a.to_dict() for a in self.accelerators]
        d["runtimes"] = {"available": sorted(self.runtimes), "threads": self.threads}
        d["targets"] = {
            "min_tokens_per_second": self.min_tokens_per_second,
            "max_first_token_ms": self.max_first_token_ms,
            "context_length": self.context_length,
        }
        d["power"] = {"budget_w": self.power_budget_w}
        return d

    def to_toml(self, header: str | None = None) -> str:
        """The profile as a TOML document that :func:`load_profile` reads back unchanged."""
        return dumps_toml(self.to_dict(), header=header)

    def summary(self) -> dict[str, Any]:
        """to_dict() plus derived figures, for ``--format json`` listings."""
        d = self.to_dict()
        d["derived"] = {
            "ram_bytes": self.ram_bytes,
            "usable_ram_bytes": self.usable_ram_bytes,
            "can_run_llm": self.can_run_llm,
        }
        if self.path is not None:
            d["derived"]["path"] = str(self.path)
        return d


def _ram_gb(ram_bytes: int) -> float:
    """GiB with at most 6 decimals when that still maps back to the same byte count."""
    short = round(ram_bytes / GIB, 6)
    return short if int(round(short * GIB)) == ram_bytes else ram_bytes / GIB


def _ordered(items: Iterable[str], order: list[str]) -> list[str]:
    rank = {k: i for i, k in enumerate(order)}
    return sorted(items, key=lambda x: (rank.get(x, len(order)), x))


# --------------------------------------------------------------------------- loading


def default_profiles_dir() -> Path:
    """Where shipped profiles live.

    Search order: ``$EDGELLM_PROFILES_DIR``; ``hardware_profiles/`` at the repository root next to
    the package (source checkouts, editable installs); ``sys.prefix/share/edgellm/hardware_profiles``
    (wheel installs, via setuptools data-files).
    """
    env = os.environ.get(PROFILES_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise ProfileError(
                f"{PROFILES_ENV}={env}: not a directory",
                hint=f"point {PROFILES_ENV} at a folder of *.toml profiles, or unset it",
            )
        return p
    candidates = [
        Path(__file__).resolve().parent.parent / "hardware_profiles",
        Path(sys.prefix) / "share" / "edgellm" / "hardware_profiles",
    ]
    for c in candidates:
        if c.is_dir():
            return c
    raise ProfileError(
        "no hardware_profiles directory found (looked in: " + ", ".join(str(c) for c in candidates) + ")",
        hint=f"set {PROFILES_ENV} or pass --dir to a folder of *.toml profiles",
    )


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate one profile file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ProfileError(
            f"{p}: cannot read: {e.strerror or e}",
            hint="check the path; `edgellm profiles list` shows the known profiles",
        ) from e
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"{p}: not valid TOML: {e}", hint="fix the syntax; " + _SCHEMA_HINT) from e
    return Profile.from_dict(data, file=p, path=p)


def load_profiles(directory: str | os.PathLike[str] | None = None) -> dict[str, Profile]:
    """All ``*.toml`` profiles in ``directory`` (default: :func:`default_profiles_dir`), by name."""
    d = Path(directory) if directory is not None else default_profiles_dir()
    if not d.is_dir():
        raise ProfileError(f"{d}: not a directory", hint="pass a folder of *.toml hardware profiles")
    out: dict[str, Profile] = {}
    for f in sorted(d.glob("*.toml")):
        prof = load_profile(f)
        out[prof.name] = prof
    return out


def get_profile(name: str, directory: str | os.PathLike[str] | None = None) -> Profile:
    """The profile called ``name``; an unknown name raises ProfileError listing the known ones."""
    profiles = load_profiles(directory)
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "(none)"
        raise ProfileError(
            f"unknown hardware profile {name!r}; known profiles: {known}",
            hint="run `edgellm profiles list`, or add hardware_profiles/<name>.toml",
        )
    return profiles[name]

"""Typed wire/disk records that keep what they do not know.

A newer server must not break an older agent, and a manifest written by a newer edgellm must
survive a read/write round trip here: dataclasses mixing in :class:`Record` put unknown keys in
their ``extra`` field on the way in and back on the way out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


def plain(v: Any) -> Any:
    """Records (also inside lists and dicts) to plain JSON-able values."""
    if isinstance(v, Record):
        return v.to_dict()
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v


_NAMES: dict[type, frozenset[str]] = {}
_REQUIRED: dict[type, frozenset[str]] = {}


def field_names(cls: type) -> frozenset[str]:
    """A record class's field names but ``extra`` (cached: telemetry ingest splits thousands a second)."""
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls)) - {"extra"}
    return names


def required_fields(cls: type) -> frozenset[str]:
    """Fields without a default (cached per class)."""
    req = _REQUIRED.get(cls)
    if req is None:
        req = _REQUIRED[cls] = frozenset(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
    return req


class Record:
    """Mixin for a dataclass with an ``extra: dict`` field. Subclasses convert nested records by
    overriding ``from_dict`` and calling ``super().from_dict`` with the converted dict."""

    #: raised for input that is not an object or does not fit the fields
    error: ClassVar[type[Exception]] = ValueError

    @classmethod
    def split(cls, d: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        if not isinstance(d, dict):
            raise cls.error(f"{cls.__name__}: expected an object, got {type(d).__name__}")
        names = field_names(cls)
        return {k: v for k, v in d.items() if k in names}, {k: v for k, v in d.items() if k not in names}

    @classmethod
    def from_dict(cls, d: Any) -> Any:
        return cls.build(*cls.split(d))

    @classmethod
    def build(cls, known: dict[str, Any], extra: dict[str, Any]) -> Any:
        """The record from an already :meth:`split` dict."""
        try:
            return cls(**known, extra=extra)  # type: ignore[call-arg]  # every Record dataclass has an `extra` field
        except TypeError as e:
            raise cls.error(f"{cls.__name__}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}  # type: ignore[arg-type]  # a mixin: self is a dataclass
        return {**self.extra, **out}  # type: ignore[attr-defined]  # declared by each dataclass

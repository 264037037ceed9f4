"""Adapter bundles: what both sides agree on (no torch, no native code).

An adapter bundle is an ordinary bundle (signed and verified exactly like a full one) whose
manifest says ``"kind": "adapter"`` and names the base it patches::

    "kind": "adapter",
    "artifact": "adapter.gguf",              # llama.cpp's LoRA adapter GGUF
    "base": {"name": "tiny", "version": "0.1.0", "runtime": "gguf",
             "artifact_sha256": "<sha256 of the base bundle's model.gguf>"}

A device applies it only on top of exactly that base artifact. The local API addresses base +
adapter as ``"<base>:<adapter>"`` (``"tiny:kitchen"``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from edgellm._record import Record
from edgellm.errors import BundleError

KIND_ADAPTER = "adapter"
ADAPTER_ARTIFACT = "adapter.gguf"
SEPARATOR = ":"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass
class BaseRef(Record):
    """The base an adapter was built for: name, version and the sha256 of its artifact."""

    name: str
    version: str
    artifact_sha256: str
    runtime: str = "gguf"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    error = BundleError

    def validate(self) -> BaseRef:
        for field in ("name", "version"):
            v = getattr(self, field)
            if not isinstance(v, str) or not _NAME_RE.match(v):
                raise BundleError(
                    f"manifest.json: base.{field} must be 1-128 chars of [A-Za-z0-9._-], got {v!r}",
                    hint="rebuild the adapter bundle with `edgellm build --adapter`",
                )
        if not isinstance(self.artifact_sha256, str) or not _SHA_RE.match(self.artifact_sha256):
            raise BundleError(
                "manifest.json: base.artifact_sha256 must be 64 lowercase hex chars",
                hint="rebuild the adapter bundle with `edgellm build --adapter`",
            )
        if self.runtime != "gguf":
            raise BundleError(
                f"manifest.json: adapters apply to GGUF bases only, not {self.runtime!r}",
                hint="ship a merged full bundle to devices on other runtimes",
            )
        return self


def is_adapter(manifest: Any) -> bool:
    return (getattr(manifest, "extra", None) or {}).get("kind") == KIND_ADAPTER


def base_of(manifest: Any) -> BaseRef:
    """The typed, validated base reference of an adapter manifest."""
    if not is_adapter(manifest):
        raise BundleError(
            f"{manifest.name} {manifest.version} is not an adapter bundle", hint="install it as a full bundle"
        )
    ref: BaseRef = BaseRef.from_dict(manifest.extra.get("base"))
    return ref.validate()


def split_model_id(model: str) -> tuple[str, str | None]:
    """``"tiny:kitchen"`` -> ``("tiny", "kitchen")``; ``"tiny"`` -> ``("tiny", None)``."""
    base, sep, adapter = model.partition(SEPARATOR)
    return base, (adapter if sep else None)


def model_id(base: str, adapter: str | None) -> str:
    return base if adapter is None else f"{base}{SEPARATOR}{adapter}"

"""What a rollout ships to each device: the adapter on its base, or the full bundle.

A release (``model`` ``version``) may have LoRA adapter bundles beside its full bundles — a
federated run publishes ``tiny`` 1.1.0 merged full bundles and ``federated`` 1.1.0 adapter
bundles built on the 1.0.0 artifacts. An adapter applies only on exactly the artifact it was
built for, which its signed target names (``custom.edgellm.base.artifact_sha256``). A device
gets the adapter when it runs that artifact — its model and version as it reports them, its
profile's published bundle of that version, that bundle's artifact sha256 (from the target's
custom data, or its manifest in the server's own repository for targets published before the
custom data carried it) — and the release's full bundle for its profile otherwise. Bytes on the
wire are the TUF target lengths: what the device downloads.
"""

from __future__ import annotations

from typing import Any

from edgellm.ids import ID_RULE, valid_id
from server.errors import RolloutError
from server.store.rows import Choice

__all__ = ["PREFER", "Choice", "Release", "parse_adapter"]

PREFER = ("adapter", "full")


def parse_adapter(text: str | None, version: str) -> tuple[str, str] | None:
    """``NAME`` or ``NAME@VERSION`` (the version defaults to the rollout's)."""
    if not text:
        return None
    name, _, v = text.partition("@")
    v = v or version
    if not valid_id(name) or not valid_id(v):
        raise RolloutError(f"--adapter {text!r} is not NAME or NAME@VERSION", hint=f"use {ID_RULE}")
    return name, v


def _facts(t: Any) -> dict[str, Any]:
    facts = t.custom.get("edgellm")
    return facts if isinstance(facts, dict) else {}


class Release:
    """The published bundles of a rollout's release, and each device's choice among them."""

    def __init__(
        self, repo: Any, model: str, version: str, *, adapter: tuple[str, str] | None = None, prefer: str = "adapter"
    ) -> None:
        if prefer not in PREFER:
            raise RolloutError(f"--prefer {prefer!r} is not one of {', '.join(PREFER)}", hint="--prefer adapter")
        self.repo, self.model, self.version, self.prefer = repo, model, version, prefer
        self.targets = repo.list_targets()
        self._sha: dict[str, str | None] = {}
        adapters = [
            t for t in self.targets if _facts(t).get("kind") == "adapter" and self._base(t).get("name") == model
        ]
        if adapter is None:  # the adapters published at the release's version, if they are one
            adapters = [t for t in adapters if _facts(t).get("version") == version]
            if len({_facts(t).get("name") for t in adapters}) > 1:
                names = sorted({str(_facts(t).get("name")) for t in adapters})
                raise RolloutError(
                    f"{model} {version} has adapter bundles of several names ({', '.join(names)})",
                    hint=f"name one: --adapter {names[0]} (or --prefer full)",
                )
        else:
            adapters = [t for t in adapters if (_facts(t).get("name"), _facts(t).get("version")) == adapter]
            if not adapters:
                raise RolloutError(
                    f"the repository has no adapter bundle {adapter[0]} {adapter[1]} on {model}",
                    hint="publish it (`edgellm build --adapter ... --repo`), or leave out --adapter",
                )
        self.adapters = adapters if prefer == "adapter" else []

    @staticmethod
    def _base(t: Any) -> dict[str, Any]:
        base = _facts(t).get("base")
        return base if isinstance(base, dict) else {}

    @property
    def adapter(self) -> tuple[str, str] | None:
        """The adapter this release ships, as (name, version), or None."""
        return (
            (str(_facts(self.adapters[0])["name"]), str(_facts(self.adapters[0])["version"])) if self.adapters else None
        )

    def _full(self, model: str | None, version: str | None, profile: str | None) -> list[Any]:
        return [
            t
            for t in self.targets
            if _facts(t).get("kind") is None
            and (_facts(t).get("name"), _facts(t).get("version")) == (model, version)
            and profile in (_facts(t).get("profiles") or [])
        ]

    def _artifact_sha256(self, t: Any) -> str | None:
        if t.name not in self._sha:
            sha = _facts(t).get("artifact_sha256")
            if not isinstance(sha, str):
                try:
                    from edgellm.bundle import read_manifest

                    m = read_manifest(self.repo.target_path(t.name))
                    sha = m.file(m.artifact).sha256
                except Exception:  # noqa: BLE001 - unreadable: the device gets the full bundle
                    sha = None
            self._sha[t.name] = sha
        return self._sha[t.name]

    def choose(self, device: Any) -> Choice:
        """The adapter when ``device`` runs exactly its base artifact, else the full bundle."""
        running = {self._artifact_sha256(t) for t in self._full(device.model, device.version, device.profile)}
        for t in self.adapters:
            base = self._base(t)
            if (
                len(running) == 1
                and base.get("artifact_sha256") in running
                and (base.get("name"), base.get("version")) == (device.model, device.version)
                and device.profile in (_facts(t).get("profiles") or [])
            ):
                f = _facts(t)
                return Choice("adapter", self.model, str(device.version), t.name, t.length, f["name"], f["version"])
        full = self._full(self.model, self.version, device.profile)
        return Choice(
            "full", self.model, self.version, full[0].name if full else None, full[0].length if full else None
        )

"""Serving several LoRA adapters on one loaded base: ``"model": "tiny:kitchen"``.

The daemon decides *which* adapters the served base should have (:func:`sync_adapters`, from
the adapter pointer); the engine's worker thread — the only thread that touches llama.cpp —
makes it so between two jobs and applies the one a job asks for (:func:`select_adapter`).
Switching adapters costs no model reload: llama.cpp applies an adapter to the context, and the
base weights are shared by all of them.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
    name: str
    version: str
    path: Path          # the adapter GGUF inside its verified directory
    sha256: str
    size: int


class ServedAdapters:
    """The adapters one base serves. ``want`` from any thread; ``prepare`` from the engine's worker only."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime
        self._lock = threading.Lock()
        self._wanted: dict[str, AdapterEntry] = {}
        self._loaded: dict[str, AdapterEntry] = {}
        self._lora: Any = None

    def want(self, entries: list[AdapterEntry]) -> None:
        with self._lock:
            self._wanted = {e.name: e for e in entries}

    @property
    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return sorted(self._wanted.values(), key=lambda e: e.name)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._wanted

    def prepare(self, name: str | None) -> AdapterEntry | None:
        """Load/unload to match what is wanted, then serve ``name`` (None: the base alone)."""
        from edgellm.runtime.lora import LoraAdapters

        with self._lock:
            wanted = dict(self._wanted)
        if self._lora is None:
            self._lora = LoraAdapters(self._runtime)
        for old in [n for n, e in self._loaded.items() if wanted.get(n) != e]:
            self._lora.unload(old)
            del self._loaded[old]
        entry = None
        if name is not None:
            entry = wanted.get(name)
            if entry is None:
                raise KeyError(name)
            if name not in self._loaded:
                self._lora.load(name, entry.path, sha256=entry.sha256, size=entry.size)
                self._loaded[name] = entry
        self._lora.activate(name)
        return entry


def select_adapter(handle: Any, name: str | None) -> str | None:
    """Called by the engine's worker before a job: apply ``name`` on ``handle``; an error message or None."""
    served: ServedAdapters | None = getattr(handle, "adapters", None)
    if served is None:
        return None if name is None else f"adapter {name!r} is not served here: this model takes no adapters"
    try:
        served.prepare(name)
    except KeyError:
        return f"adapter {name!r} is not installed on {handle.name}"
    except Exception as e:  # noqa: BLE001 - a verified adapter that fails to load: refuse the request, keep serving
        log.exception("adapter %s could not be applied", name)
        return f"adapter {name!r} could not be applied: {e}"
    return None


def sync_adapters(paths: Any, state: Any, handle: Any, last_key: tuple | None) -> tuple | None:
    """Give the served base the adapters the pointer installs for it; returns the new key."""
    from agent.adapters import AdapterStore, base_artifact_sha256
    from agent.manifest import read_manifest

    if handle is None or handle.kind != "gguf" or state.current != handle.slot:
        return None
    store = AdapterStore(paths)
    base_sha = base_artifact_sha256(paths, state)
    pairs = store.for_base(base_sha)
    key = (id(handle), base_sha, tuple((rec.name, rec.manifest_sha256) for rec, _ in pairs))
    if key == last_key:
        return key
    entries = []
    for rec, d in pairs:
        try:
            m = read_manifest(d)
            art = m.file(m.artifact)
        except Exception as e:  # noqa: BLE001 - a broken directory is skipped (and swept at the next boot)
            log.error("adapter %s not served: %s", rec.dirname, e)
            continue
        entries.append(AdapterEntry(rec.name, rec.version, d / m.artifact, art.sha256, art.size))
    if getattr(handle, "adapters", None) is None:
        handle.adapters = ServedAdapters(handle.runtime)
    handle.adapters.want(entries)
    log.info("serving adapters", extra={"model": handle.name, "adapters": [e.name for e in entries]})
    return key

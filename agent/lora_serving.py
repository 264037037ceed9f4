"""Serving several LoRA adapters on one loaded base: ``"model": "tiny:kitchen"``.

A loaded GGUF base gets a :class:`ServedAdapters` (:func:`served`): which adapters it serves is
read from the adapter pointer whenever that file changes (an install or a rollback by the CLI is
picked up at the next request); the engine's worker thread — the only thread that touches
llama.cpp — loads, unloads and applies them between two jobs (:func:`select_adapter`).
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
    path: Path  # the adapter GGUF inside its verified directory
    sha256: str
    size: int


class ServedAdapters:
    """The adapters one loaded base serves, read from the adapter pointer whenever it changes.

    ``entries``/``__contains__`` from any thread; ``prepare`` from the engine's worker only."""

    def __init__(self, runtime: Any, paths: Any, base_sha256: str) -> None:
        from agent.adapters import AdapterStore

        self._runtime = runtime
        self._store = AdapterStore(paths)
        self._base_sha256 = base_sha256
        self._lock = threading.Lock()
        self._seen: tuple | None = None
        self._wanted: dict[str, AdapterEntry] = {}
        self._loaded: dict[str, AdapterEntry] = {}
        self._lora: Any = None

    def _refresh(self) -> dict[str, AdapterEntry]:
        """What the pointer installs for this base (re-read only when the pointer file changed)."""
        try:
            st = self._store.state_path.stat()
            seen: tuple | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            seen = None
        with self._lock:
            if seen != self._seen:
                self._wanted = {e.name: e for e in _entries(self._store, self._base_sha256)}
                self._seen = seen
                log.info("serving adapters", extra={"adapters": sorted(self._wanted)})
            return dict(self._wanted)

    @property
    def entries(self) -> list[AdapterEntry]:
        return sorted(self._refresh().values(), key=lambda e: e.name)

    def __contains__(self, name: object) -> bool:
        return name in self._refresh()

    def prepare(self, name: str | None) -> AdapterEntry | None:
        """Load/unload to match what is wanted, then serve ``name`` (None: the base alone)."""
        from edgellm.runtime.lora import LoraAdapters

        wanted = self._refresh()
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


def _entries(store: Any, base_sha256: str) -> list[AdapterEntry]:
    from agent.manifest import read_manifest

    out = []
    for rec, d in store.for_base(base_sha256):
        try:
            m = read_manifest(d)
            art = m.file(m.artifact)
        except Exception as e:  # noqa: BLE001 - a broken directory is skipped (and swept at the next boot)
            log.error("adapter %s not served: %s", rec.dirname, e)
            continue
        out.append(AdapterEntry(rec.name, rec.version, d / m.artifact, art.sha256, art.size))
    return out


def served(paths: Any, slot: str, runtime: Any, manifest: Any) -> ServedAdapters | None:
    """The adapters a freshly loaded base will serve (GGUF bases only). Sweeps what an interrupted
    adapter install left and drops adapters that no longer verify, unless an install is running."""
    from agent._fs import file_lock
    from agent.adapters import AdapterStore
    from agent.errors import LockTimeout

    if manifest.runtime != "gguf":
        return None
    try:
        with file_lock(paths.lock, timeout=0):
            AdapterStore(paths).boot()
    except LockTimeout:  # an install holds the lock: it sweeps for itself
        pass
    return ServedAdapters(runtime, paths, manifest.file(manifest.artifact).sha256)


def adapter_status(paths: Any, slots: Any) -> dict[str, Any]:
    """Installed adapters (and whether each applies to the base now serving), for `status`."""
    from agent.adapters import AdapterStore, base_artifact_sha256

    state = AdapterStore(paths).load()
    try:
        base = base_artifact_sha256(paths, slots)
    except Exception:  # noqa: BLE001 - a status never fails on a slot being replaced
        base = None
    return {
        "installed": [
            {
                "name": r.name,
                "version": r.version,
                "base": f"{r.base_name} {r.base_version}",
                "serving": r.base_sha256 == base,
            }
            for r in sorted(state.adapters.values(), key=lambda r: r.name)
        ],
        "rejected": state.rejected,
        "last_update": state.last_result,
    }


def select_adapter(handle: Any, name: str | None) -> str | None:
    """Called by the engine's worker before a job: apply ``name`` on ``handle``; an error message or None."""
    served: ServedAdapters | None = getattr(handle, "adapters", None)
    if served is None:
        return None if name is None else f"adapter {name!r} is not served here: this model takes no adapters"
    try:
        served.prepare(name)
    except KeyError:
        return f"adapter {name!r} is not installed on {handle.name}"
    except Exception as e:
        log.exception("adapter %s could not be applied", name)
        return f"adapter {name!r} could not be applied: {e}"
    return None

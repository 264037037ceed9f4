"""LoRA adapter bundles installed on top of the base model the device already runs.

An adapter bundle (:mod:`edgellm.adapters`) is verified exactly like a full bundle (signature,
hash, length: the installer's envelope or TUF path), then installed *next to* the base — never a
second copy of it — under ``DIR/adapters/``::

    adapters/state.json          the adapter pointer: name -> AdapterRecord (written atomically)
    adapters/<name>@<version>/   an unpacked, verified adapter bundle (manifest + adapter.gguf)
    adapters/staging/            scratch of an install in progress

Install: refuse an adapter whose base is not the current slot's artifact (by sha256, with the
reason), unpack into staging, rename into place, health-check base + adapter with the adapter's
own golden prompts (child process), then one atomic pointer write makes it served. A kill at any
instant leaves the pointer naming only complete, verified adapter directories; what it does not
name is swept at the next boot or install. Rollback drops the adapter from the pointer: the base
keeps serving, untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

from agent._fs import atomic_write_json, fsync_dir, read_json, remove_tree
from agent.config import AgentPaths
from agent.errors import AgentError, AlreadyCurrent, HealthCheckFailed, InstallError, UpdateRefused, message_of
from agent.manifest import manifest_sha256, read_manifest, verify_slot
from agent.slots import AgentState, SlotStore, result
from edgellm._record import Record

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AdapterRecord(Record):
    """What was verified and installed for one adapter name."""

    name: str
    version: str
    manifest_sha256: str
    base_name: str
    base_version: str
    base_sha256: str
    source: str = "offline"
    target: str | None = None
    installed_at: float = 0.0
    health: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def dirname(self) -> str:
        return f"{self.name}@{self.version}"


@dataclasses.dataclass
class AdapterState(Record):
    adapters: dict[str, AdapterRecord] = dataclasses.field(default_factory=dict)
    rejected: list[str] = dataclasses.field(default_factory=list)  # "name@version" that failed or were dropped
    last_result: dict[str, Any] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterState:
        d = dict(d)
        d["adapters"] = {k: AdapterRecord.from_dict(v) for k, v in (d.get("adapters") or {}).items()}
        return super().from_dict(d)


class BaseNotInstalled(UpdateRefused):
    """An adapter whose base is not the model this device runs (install the base first)."""

    def __init__(self, message: str, *, hint: str, base: Any) -> None:
        super().__init__(message, hint=hint)
        self.base = base


def base_artifact_sha256(paths: AgentPaths, state: AgentState) -> str | None:
    """sha256 of the current slot's artifact, as its verified manifest records it."""
    if state.current is None or state.current_record is None:
        return None
    m = read_manifest(paths.slot_dir(state.current))
    return m.file(m.artifact).sha256


def base_mismatch(paths: AgentPaths, name: str, version: str, base: Any) -> str | None:
    """Why adapter ``name`` ``version`` cannot apply to what this device runs (None: it can).
    ``base`` is a validated :class:`edgellm.adapters.BaseRef` (from the verified manifest, or the
    signed target's custom data before anything is downloaded)."""
    slots = SlotStore(paths).load()
    cur = slots.current_record
    have = base_artifact_sha256(paths, slots)
    if cur is not None and have == base.artifact_sha256 and cur.name == base.name:
        return None
    running = f"{cur.name} {cur.version} (sha256 {(have or '')[:12]}…)" if cur else "no model"
    return (
        f"adapter {name} {version} applies to base {base.name} {base.version} "
        f"(sha256 {base.artifact_sha256[:12]}…), but this device runs {running}"
    )


class AdapterStore:
    """The adapter pointer and directories. Callers hold the install lock to mutate."""

    def __init__(self, paths: AgentPaths) -> None:
        self.paths = paths
        self.root = paths.root / "adapters"
        self.state_path = self.root / "state.json"
        self.staging = self.root / "staging"

    def load(self) -> AdapterState:
        if not self.state_path.exists():
            return AdapterState()
        try:
            return AdapterState.from_dict(read_json(self.state_path))
        except (ValueError, TypeError, AttributeError) as e:
            raise AgentError(
                f"{self.state_path} is not a valid adapter pointer ({e})",
                hint="it is only ever written atomically by the agent: delete it (the base keeps "
                "serving) and install the adapters again",
            ) from e

    def save(self, state: AdapterState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.state_path, state.to_dict())

    def dir_of(self, rec: AdapterRecord) -> Path:
        return self.root / rec.dirname

    def for_base(self, base_sha256: str | None) -> list[tuple[AdapterRecord, Path]]:
        """The installed adapters that apply to this base, with their verified directories."""
        out = []
        for rec in self.load().adapters.values():
            if base_sha256 is not None and rec.base_sha256 == base_sha256:
                out.append((rec, self.dir_of(rec)))
        return sorted(out, key=lambda x: x[0].name)

    def sweep(self) -> None:
        """Remove what the pointer does not name (an interrupted install's leftovers)."""
        remove_tree(self.staging)
        if not self.root.is_dir():
            return
        keep = {rec.dirname for rec in self.load().adapters.values()}
        for p in self.root.iterdir():
            if p.is_dir() and p.name not in keep:
                remove_tree(p)
        for tmp in self.root.glob(".state.json.*.tmp"):
            tmp.unlink(missing_ok=True)

    def boot(self) -> None:
        """At daemon start: sweep, and drop adapters whose files no longer verify."""
        self.sweep()
        state = self.load()
        bad = []
        for name, rec in state.adapters.items():
            try:
                verify_slot(self.dir_of(rec), rec.manifest_sha256)
            except AgentError as e:
                log.error("adapter %s failed verification: %s", rec.dirname, e)
                bad.append(name)
        if bad:
            for name in bad:
                state.adapters.pop(name)
            state.last_result = result("revert", False, reason=f"adapters {bad} failed verification: dropped")
            self.save(state)
            self.sweep()

    def drop(self, name: str, *, reason: str = "rollback requested", reject: bool = True) -> dict:
        """Roll back an adapter: serve the base alone. ``reject``: its version is not taken again
        unasked (a fleet that stops assigning it rejects nothing: it may assign it again)."""
        state = self.load()
        rec = state.adapters.pop(name, None)
        if rec is None:
            raise UpdateRefused(
                f"no adapter {name!r} is installed", hint="list installed adapters with `edgellm-agent status`"
            )
        if reject and rec.dirname not in state.rejected:
            state.rejected.append(rec.dirname)
        state.last_result = result("rollback", True, version=rec.version, reason=reason, adapter=name)
        self.save(state)
        self.sweep()
        return state.last_result


def _crashpoint(name: str) -> None:
    from agent.install import _crashpoint as crash  # the installer's one test hook

    crash("adapter_" + name)


class AdapterInstaller:
    """Installs one verified adapter archive; used by :class:`agent.install.Installer` (lock held)."""

    def __init__(self, installer: Any) -> None:
        self.installer = installer
        self.paths: AgentPaths = installer.paths
        self.store = AdapterStore(self.paths)

    def _fail(
        self,
        reason: str,
        *,
        version: str | None,
        adapter: str | None,
        reject: bool = False,
        event: str = "update.failed",
    ) -> None:
        state = self.store.load()
        if reject and adapter and version and f"{adapter}@{version}" not in state.rejected:
            state.rejected.append(f"{adapter}@{version}")
        state.last_result = result("install", False, version=version, reason=reason, adapter=adapter)
        self.store.save(state)
        self.installer.on_event(event, version=version, reason=reason, adapter=adapter)

    def check_base(self, manifest: Any) -> Any:
        """The adapter's base must be the artifact the current slot serves; returns the base reference."""
        from edgellm.adapters import base_of

        base = base_of(manifest)
        why = base_mismatch(self.paths, manifest.name, manifest.version, base)
        if why is not None:
            raise BaseNotInstalled(
                why, hint=f"install base {base.name} {base.version} first, then the adapter", base=base
            )
        return base

    def install(
        self, archive: Path, target: Any, *, source: str, force: bool = False, downloaded: int | None = None
    ) -> dict:
        from edgellm.bundle import read_manifest as read_archive_manifest
        from edgellm.bundle import unpack

        manifest = read_archive_manifest(archive)  # the archive was verified: parsing it is allowed
        name, version = manifest.name, manifest.version
        if target is not None and target.version and (target.version, target.name) != (version, name):
            reason = f"bundle says {name} {version} but the signed target says {target.name} {target.version}"
            self._fail(reason, version=version, adapter=name)
            raise InstallError(reason, hint="the repository is inconsistent: rebuild and republish the bundle")
        try:
            base = self.check_base(manifest)
        except AgentError as e:
            self._fail(message_of(e), version=version, adapter=name, event="update.refused")
            raise
        except Exception as e:  # a malformed base reference in a signed manifest
            self._fail(message_of(e), version=version, adapter=name)
            raise InstallError(
                f"adapter {name} {version}: {message_of(e)}",
                hint="rebuild the adapter bundle with `edgellm build --adapter`",
            ) from e
        state = self.store.load()
        cur = state.adapters.get(name)
        if f"{name}@{version}" in state.rejected and not force:
            reason = f"adapter {name} {version} was rejected earlier (failed health check or rolled back)"
            self._fail(reason, version=version, adapter=name, event="update.refused")
            raise UpdateRefused(reason, hint="pass --force to try it again")
        if cur is not None and cur.version == version and cur.base_sha256 == base.artifact_sha256 and not force:
            raise AlreadyCurrent(f"adapter {name} {version} is already installed", hint="nothing to do")
        if cur is not None and cur.version == version:  # a forced reinstall: forget it, then replace it
            state.adapters.pop(name)
            self.store.save(state)
        self.store.sweep()
        self.store.root.mkdir(parents=True, exist_ok=True)
        staging = self.store.staging / "unpack"
        try:
            unpack(archive, staging, **self.installer._unpack_kwargs())
        except Exception as e:
            remove_tree(staging)
            self._fail(f"adapter bundle could not be unpacked: {message_of(e)}", version=version, adapter=name)
            raise InstallError(
                f"adapter bundle could not be unpacked: {message_of(e)}",
                hint="the file is damaged or not an edgellm bundle; rebuild or re-download it",
            ) from e
        _crashpoint("unpacked")
        rec = AdapterRecord(
            name=name,
            version=version,
            manifest_sha256=manifest_sha256(staging),
            base_name=base.name,
            base_version=base.version,
            base_sha256=base.artifact_sha256,
            source=source,
            target=getattr(target, "path", None),
            installed_at=time.time(),
        )
        final = self.store.dir_of(rec)
        from agent.install import _fsync_tree

        os.rename(staging, final)
        fsync_dir(self.store.root)
        _crashpoint("renamed")
        _fsync_tree(final)
        verify_slot(final, rec.manifest_sha256)
        return self._health_and_switch(rec, final, manifest, downloaded)

    def _health_and_switch(self, rec: AdapterRecord, final: Path, manifest: Any, downloaded: int | None) -> dict:
        slots = SlotStore(self.paths).load()
        assert slots.current is not None
        budget = self.installer._budget(manifest)
        self.installer.on_event("update.health_check", version=rec.version, adapter=rec.name)
        report = self.installer.health_runner(
            self.paths.slot_dir(slots.current),
            budget,
            timeout=self.installer.config.health_timeout_s,
            adapter_dir=final,
        )
        _crashpoint("health_checked")
        if not report.get("ok"):
            remove_tree(final)
            reason = f"health check failed: {report.get('reason')}"
            self._fail(reason, version=rec.version, adapter=rec.name, reject=True)
            raise HealthCheckFailed(
                f"adapter {rec.name} {rec.version} {reason}",
                report=report,
                hint="the base (and any previous adapter) keeps serving; fix the adapter bundle",
            )
        rec.health = report
        state = self.store.load()
        previous = state.adapters.get(rec.name)
        state.adapters[rec.name] = rec
        if rec.dirname in state.rejected:
            state.rejected.remove(rec.dirname)
        state.last_result = result(
            "install",
            True,
            version=rec.version,
            adapter=rec.name,
            from_version=previous.version if previous else None,
            bytes_downloaded=downloaded,
        )
        self.store.save(state)  # the one atomic write that makes it served
        _crashpoint("switched")
        self.store.sweep()  # the previous version's directory
        log.info("installed adapter %s %s on %s %s", rec.name, rec.version, rec.base_name, rec.base_version)
        self.installer.on_event(
            "update.installed",
            version=rec.version,
            model=f"{rec.base_name}:{rec.name}",
            adapter=rec.name,
            tokens_per_second=report.get("tokens_per_second"),
            bytes_downloaded=downloaded,
        )
        return state.last_result

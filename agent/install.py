"""Installs verified bundles into the inactive slot, health-checks them and switches.

Online updates (:meth:`Installer.update`) and offline envelopes (:meth:`Installer.install_envelope`)
share one path, :meth:`Installer._install_verified`:

1. forget the inactive slot's record (pointer write), then wipe its files;
2. unpack the *verified* archive into ``slots/staging`` (safe unpack, size limits), check the
   manifest is the target that was verified, rename staging to the slot, fsync;
3. health check in a child process (load, golden prompts, tokens/s and memory budget);
4. one atomic pointer write: record the slot and make it current, on trial.

A failure at 2 or 3 leaves the current slot untouched, records why in ``last_result`` and adds the
version to ``rejected`` (a failed health check); a kill at any instant does the same by construction.
All mutations happen under an exclusive ``flock`` shared by the daemon and the CLI.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent._fs import file_lock, fsync_dir, remove_tree
from agent.config import AgentConfig, AgentPaths
from agent.errors import AlreadyCurrent, HealthCheckFailed, InstallError, UpdateRefused, hint_of, message_of
from agent.health import HealthBudget, budget_for, run_health_check
from agent.manifest import manifest_sha256, verify_slot
from agent.schemas import UpdateRequest
from agent.slots import AgentState, SlotRecord, SlotStore, result
from agent.source import TargetInfo, UpdateSource, compare_versions

log = logging.getLogger(__name__)

EventSink = Callable[..., None]


def load_profile(name: str) -> Any | None:
    """The hardware profile (edgellm.profiles), or None when it cannot be loaded."""
    try:
        from edgellm.profiles import get_profile

        return get_profile(name)
    except Exception as e:  # noqa: BLE001 - an unknown profile only loses the profile budget
        log.warning("hardware profile %r not loaded (%s): using the bundle's own budget", name, e)
        return None


CRASH_ENV = "EDGELLM_AGENT_CRASH_AT"


def _crashpoint(name: str) -> None:
    """Test hook: ``EDGELLM_AGENT_CRASH_AT=name`` SIGKILLs the process here (crash-safety tests)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), 9)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            fd = os.open(os.path.join(dirpath, fn), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _is_adapter_archive(archive: Path) -> bool:
    """Whether a verified archive holds an adapter bundle (a damaged one goes the full-bundle way,
    whose unpack reports what is wrong)."""
    from edgellm.adapters import is_adapter
    from edgellm.bundle import read_manifest

    try:
        return is_adapter(read_manifest(archive))
    except Exception:  # noqa: BLE001 - unreadable here means "not an adapter"; the full install verifies and says why
        return False


def _applicable(targets: list[TargetInfo], paths: AgentPaths, state: AgentState) -> list[TargetInfo]:
    """Full bundles, and adapter bundles whose base is the artifact the current slot runs."""
    if not any(t.custom.get("kind") == "adapter" for t in targets):
        return targets
    from agent.adapters import base_artifact_sha256

    have = base_artifact_sha256(paths, state)
    return [
        t
        for t in targets
        if t.custom.get("kind") != "adapter" or (t.custom.get("base") or {}).get("artifact_sha256") == have
    ]


def _adapter_installed(paths: AgentPaths, target: TargetInfo) -> bool:
    from agent.adapters import AdapterStore

    have = AdapterStore(paths).load().adapters.get(target.name)
    return have is not None and have.version == target.version


class Installer:
    def __init__(
        self,
        paths: AgentPaths,
        config: AgentConfig,
        *,
        health_runner: Callable[..., dict] = run_health_check,
        on_event: EventSink | None = None,
        profile: Any | None = None,
    ) -> None:
        self.paths = paths
        self.config = config
        self.store = SlotStore(paths)
        self.health_runner = health_runner
        self.on_event = on_event or (lambda kind, **f: None)
        self._profile = profile

    def lock(self, timeout: float | None = None):
        self.paths.root.mkdir(parents=True, exist_ok=True)
        return file_lock(self.paths.lock, timeout=timeout)

    @property
    def profile(self) -> Any | None:
        if self._profile is None:
            self._profile = load_profile(self.config.profile)
        return self._profile

    # -- policy ----------------------------------------------------------------------------------

    def _check_policy(
        self,
        state: AgentState,
        name: str,
        version: str,
        *,
        allow_downgrade: bool,
        force: bool,
        allow_model_change: bool = False,
    ) -> None:
        cur = state.current_record
        problem: tuple[str, str] | None = None
        if version in state.rejected and not force:
            problem = (
                f"version {version} was rejected earlier (failed health check or rolled back)",
                "pass --force to try it again",
            )
        elif cur is not None:
            c = compare_versions(version, cur.version)
            if cur.name and name and cur.name != name and not (force or allow_model_change):
                problem = (
                    f"bundle is model {name!r} but this device runs {cur.name!r}",
                    "pass --force to replace the model",
                )
            elif c == 0 and not force:
                raise AlreadyCurrent(
                    f"version {version} is already current", hint="nothing to do (--force reinstalls it)"
                )
            elif c < 0 and not allow_downgrade:
                problem = (
                    f"version {version} is older than the current {cur.version}",
                    "use `edgellm-agent rollback`, or pass --allow-downgrade on purpose",
                )
        if problem is not None:
            self._fail("install", version, problem[0], event="update.refused")
            raise UpdateRefused(problem[0], hint=problem[1])

    def _fail(
        self,
        action: str,
        version: str | None,
        reason: str,
        *,
        reject: bool = False,
        event: str = "update.failed",
        **extra: Any,
    ) -> None:
        state = self.store.load()
        if reject and version and version not in state.rejected:
            state.rejected.append(version)
        state.last_result = result(action, False, version=version, reason=reason, **extra)
        self.store.save(state)
        self.on_event(event, version=version, reason=reason)

    # -- the one install path --------------------------------------------------------------------

    def _install_verified(
        self,
        archive: Path,
        target: TargetInfo | None,
        *,
        source: str,
        allow_downgrade: bool = False,
        force: bool = False,
        allow_model_change: bool = False,
        downloaded: int | None = None,
    ) -> dict:
        """Caller holds the lock and has verified ``archive`` against the pinned root;
        ``downloaded``: the bytes that came over the wire for it (reported in the event)."""
        from edgellm.bundle import unpack

        if _is_adapter_archive(archive):  # a delta on top of the current base: agent.adapters
            from agent.adapters import AdapterInstaller

            return AdapterInstaller(self).install(archive, target, source=source, force=force, downloaded=downloaded)
        state = self.store.load()
        if target is not None and target.version:
            self._check_policy(
                state,
                target.name,
                target.version,
                allow_downgrade=allow_downgrade,
                force=force,
                allow_model_change=allow_model_change,
            )
        slot = state.inactive
        slot_dir = self.store.slot_dir(slot)
        self._forget_slot(state, slot)  # 1. forget, then wipe, the inactive slot
        self.paths.staging.mkdir(parents=True, exist_ok=True)
        staging = self.paths.staging / "unpack"
        # 2. safe unpack into staging, check it is what was verified, move into the slot
        try:
            manifest = unpack(archive, staging, **self._unpack_kwargs())
        except Exception as e:
            remove_tree(staging)
            msg, hint = message_of(e), hint_of(e)
            self._fail("install", target.version if target else None, f"bundle could not be unpacked: {msg}")
            raise InstallError(
                f"bundle could not be unpacked: {msg}",
                hint=hint or "the file is damaged or not an edgellm bundle; rebuild or re-download it",
            ) from e
        name, version = manifest.name, manifest.version
        if target is not None and (
            (target.version and target.version != version) or (target.name and target.name != name)
        ):
            remove_tree(staging)
            reason = f"bundle says {name} {version} but the signed target says {target.name} {target.version}"
            self._fail("install", version, reason)
            raise InstallError(reason, hint="the repository is inconsistent: rebuild and republish the bundle")
        if target is None or not target.version:
            try:
                self._check_policy(
                    state,
                    name,
                    version,
                    allow_downgrade=allow_downgrade,
                    force=force,
                    allow_model_change=allow_model_change,
                )
            except UpdateRefused:
                remove_tree(staging)
                raise
        _crashpoint("unpacked")
        os.rename(staging, slot_dir)
        _crashpoint("renamed")
        fsync_dir(self.paths.slots)
        remove_tree(self.paths.staging)
        _fsync_tree(slot_dir)
        msha = manifest_sha256(slot_dir)
        verify_slot(slot_dir, msha)
        # 3. health check in a child process
        budget = self._budget(manifest)
        self.on_event("update.health_check", version=version, slot=slot)
        report = self.health_runner(slot_dir, budget, timeout=self.config.health_timeout_s)
        _crashpoint("health_checked")
        if not report.get("ok"):
            remove_tree(slot_dir)
            reason = f"health check failed: {report.get('reason')}"
            self._fail("install", version, reason, reject=True, health=report)
            raise HealthCheckFailed(
                f"{name} {version} {reason}",
                report=report,
                hint="the previous model keeps serving; fix the bundle or the profile budget",
            )
        # 4. record + switch in one atomic pointer write
        state = self.store.load()
        previous = state.current_record
        state.slots[slot] = SlotRecord(
            name=name,
            version=version,
            runtime=manifest.runtime,
            quantization=manifest.quantization,
            manifest_sha256=msha,
            source=source,
            target=target.path if target else None,
            installed_at=time.time(),
            health=report,
        )
        if version in state.rejected:  # it passed its health check this time (a forced retry)
            state.rejected.remove(version)
        state.last_result = result(
            "install",
            True,
            version=version,
            slot=slot,
            from_version=previous.version if previous else None,
            bytes_downloaded=downloaded,
        )
        self.store.switch(state, slot, trial=True)
        _crashpoint("switched")
        log.info("installed %s %s into slot %s (on trial)", name, version, slot)
        self.on_event(
            "update.installed",
            version=version,
            model=name,
            slot=slot,
            from_version=previous.version if previous else None,
            tokens_per_second=report.get("tokens_per_second"),
            bytes_downloaded=downloaded,
        )
        return state.last_result

    def _forget_slot(self, state: AgentState, slot: str) -> None:
        if slot in state.slots or (state.trial and state.trial.previous == slot):
            state.slots.pop(slot, None)
            if state.trial and state.trial.previous == slot:
                state.trial.previous = None
            self.store.save(state)
        _crashpoint("forgotten")
        remove_tree(self.store.slot_dir(slot))
        self.store.cleanup_scratch()

    def _unpack_kwargs(self) -> dict:
        from edgellm.bundle import UnpackLimits

        n = self.config.download_max_bytes
        return {"limits": UnpackLimits(max_total_bytes=n, max_file_bytes=n)}

    def _budget(self, manifest: Any) -> HealthBudget:
        return budget_for(manifest, self.profile, threads=self.config.threads)

    # -- entry points ----------------------------------------------------------------------------

    def install_envelope(self, envelope: str | Path, request: UpdateRequest | None = None) -> dict:
        """Offline install of a signed bundle file (verified against the pinned root); ``request``
        carries ``rollback`` (allow an older version) and ``force`` (reinstall, retry a rejected one)."""
        request = request or UpdateRequest()
        from agent.source import verify_envelope

        envelope = Path(envelope)
        with self.lock():
            work = self.paths.downloads / "envelope"
            remove_tree(work)
            work.mkdir(parents=True)
            try:
                try:
                    archive, target = verify_envelope(envelope, self.paths, work)
                except Exception as e:
                    msg, hint = message_of(e), hint_of(e)
                    reason = f"{envelope.name} failed verification: {msg}"
                    self._fail("install", None, reason)
                    raise InstallError(
                        reason, hint=(hint + "; " if hint else "") + "only bundles signed by this fleet's keys install"
                    ) from e
                try:
                    return self._install_verified(
                        archive, target, source="offline", allow_downgrade=request.rollback, force=request.force
                    )
                except AlreadyCurrent as e:
                    return result("install", True, version=target.version, reason=message_of(e))
            finally:
                remove_tree(work)

    def install_envelopes(self, envelopes: list[str | Path], request: UpdateRequest | None = None) -> list[dict]:
        """Install several signed files; an adapter whose base is among them waits for it (base first)."""
        from agent.adapters import BaseNotInstalled

        results, waiting = [], []
        for env in envelopes:
            try:
                results.append(self.install_envelope(env, request))
            except BaseNotInstalled:
                waiting.append(env)
        if waiting and len(waiting) == len(envelopes):  # nothing else to install first: say why
            return results + [self.install_envelope(waiting[0], request)]
        return results + [self.install_envelope(env, request) for env in waiting]

    def select_target(self, targets: list[TargetInfo], state: AgentState, desired: UpdateRequest) -> TargetInfo | None:
        cands = [t for t in targets if self.config.profile in t.profiles and t.version]
        want_model = desired.model or (state.current_record.name if state.current_record else None)
        if want_model:
            cands = [t for t in cands if t.name == want_model]
        if desired.version:
            cands = [t for t in cands if t.version == desired.version]
        else:  # the newest this device can take: adapters only for the base it runs
            cands = [t for t in cands if t.version not in state.rejected]
            cands = _applicable(cands, self.paths, state)
        if not cands:
            return None
        best = cands[0]
        for t in cands[1:]:
            if compare_versions(t.version, best.version) > 0:
                best = t
        return best

    def update(self, source: UpdateSource, desired: UpdateRequest | None = None) -> dict:
        """One update check: refresh metadata, pick the target, download, verify, install."""
        desired = desired or UpdateRequest()
        with self.lock():
            try:
                source.refresh()
                targets = source.targets()
            except Exception as e:
                msg, hint = message_of(e), hint_of(e)
                self._fail("update", desired.version, f"repository refresh failed: {msg}")
                raise InstallError(
                    f"could not refresh the repository metadata: {msg}",
                    hint=hint or "check the server URL and the network; the current model keeps serving",
                ) from e
            state = self.store.load()
            target = self.select_target(targets, state, desired)
            cur = state.current_record
            if target is None:
                reason = (
                    f"no target {desired.version} for profile {self.config.profile}"
                    if desired.version
                    else "no matching target for this profile"
                )
                if desired.version:
                    state.last_result = result("update", False, version=desired.version, reason=reason)
                    self.store.save(state)
                    return state.last_result
                return result("update", True, version=cur.version if cur else None, reason=reason)
            adapter = target.custom.get("kind") == "adapter"  # versioned apart from the base: agent.adapters
            if adapter and _adapter_installed(self.paths, target):
                return result("update", True, version=target.version, reason="up to date", adapter=target.name)
            if cur is not None and target.version == cur.version and not adapter:
                return result("update", True, version=cur.version, reason="up to date")
            prev = state.slots.get(state.inactive)
            rollback_ok = desired.rollback
            if cur is not None and compare_versions(target.version, cur.version) < 0 and not adapter:
                if prev is not None and prev.version == target.version and prev.name == target.name:
                    # the version in the other slot is asked for: switch back locally; the version
                    # left is not rejected (it did not fail here, the fleet chose another)
                    st = self.store.rollback(reason=f"desired version is {target.version}", reject=False)
                    self.on_event(
                        "update.installed",
                        version=target.version,
                        model=target.name,
                        from_version=cur.version,
                        slot=st.current,
                        reused_slot=True,
                        bytes_downloaded=0,
                    )
                    return st.last_result or {}
                if not rollback_ok:
                    reason = (
                        f"desired {target.version} is older than the current {cur.version} "
                        "(send rollback=true to downgrade)"
                    )
                    self.on_event("update.refused", version=target.version, reason=reason)
                    state.last_result = result("update", False, version=target.version, reason=reason)
                    self.store.save(state)
                    return state.last_result
            dl = self.paths.downloads / "tuf"
            remove_tree(dl)
            dl.mkdir(parents=True)
            try:
                try:
                    archive = source.download(target, dl)
                except Exception as e:
                    msg, hint = message_of(e), hint_of(e)
                    reason = f"download of {target.path} failed: {msg}"
                    self._fail("update", target.version, reason)
                    raise InstallError(
                        reason,
                        hint=(hint + "; " if hint else "") + "the current model keeps serving; the next check retries",
                    ) from e
                return self._install_verified(
                    archive,
                    target,
                    source="tuf",
                    allow_downgrade=rollback_ok,
                    force=desired.force,
                    allow_model_change=desired.model is not None,
                    downloaded=archive.stat().st_size,
                )
            finally:
                remove_tree(dl)

    def rollback(self, adapter: str | None = None) -> dict:
        """Switch back to the previous slot; with ``adapter``, drop that adapter (the base keeps serving)."""
        if adapter is not None:
            from agent.adapters import AdapterStore

            with self.lock():
                res = AdapterStore(self.paths).drop(adapter)
            self.on_event("update.rolled_back", version=res.get("version"), adapter=adapter)
            return res
        with self.lock():
            state = self.store.rollback()
        self.on_event("update.rolled_back", version=state.current_record.version if state.current_record else None)
        return state.last_result or {}

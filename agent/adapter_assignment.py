"""The LoRA adapters a signed assignment layers on its base, applied once the base is in place.

An assignment (format v2, :class:`edgellm.trust.director.AssignedAdapter`) names each adapter
bundle by name, version and target paths. After the base is installed (or found current),
:func:`apply` brings the installed adapters in line with it:

* an assigned adapter that is not installed at that version is installed through the one
  install path (:meth:`agent.install.Installer._install_verified`: TUF verification, base check
  against the verified manifest, unpack, health check, atomic pointer write), but only after
  the signed target's custom data says its base is the artifact this device runs — an adapter
  for another base is refused with that reason before a byte of it is downloaded;
* an adapter the fleet assigned before (``AdapterRecord.source == "assignment"``) and that the
  assignment no longer names is dropped — a fleet rollback of an adapter — without rejecting
  its version (the fleet may assign it again);
* adapters installed by hand (offline envelopes, ``update --model``) are left alone;
* an assigned adapter already installed at that version is reported once per assignment serial
  (an ``adapter.active`` event), so the server sees it serving for this assignment even when
  the event of its original install was pruned or predates the rollout.

Each refusal or failure is recorded and sent as an update event, like a refused base; the base
and the other adapters keep serving.
"""

from __future__ import annotations

import logging
from typing import Any

from agent._fs import remove_tree
from agent.adapters import AdapterStore, base_mismatch
from agent.errors import AgentError, AlreadyCurrent, message_of
from agent.slots import result
from agent.source import TargetInfo, TufSource

log = logging.getLogger(__name__)

#: ``AdapterRecord.source`` of an adapter installed because the fleet assigned it
ASSIGNED = "assignment"


def apply(installer: Any, source: TufSource, assignment: Any) -> list[dict]:
    """Install the adapters ``assignment`` names and drop those it no longer names (caller:
    after the base is in place, lock not held; ``source`` refreshed). One result per adapter."""
    wanted = {a.name: a for a in assignment.adapters}
    done = []
    with installer.lock():
        store = AdapterStore(installer.paths)
        for rec in list(store.load().adapters.values()):
            if rec.source == ASSIGNED and rec.name not in wanted:
                reason = "the fleet no longer assigns it"
                done.append(store.drop(rec.name, reason=reason, reject=False))
                log.info("dropped adapter %s %s: %s", rec.name, rec.version, reason)
                installer.on_event("update.rolled_back", version=rec.version, adapter=rec.name, reason=reason)
    targets = source.targets() if wanted else []
    for a in assignment.adapters:
        done.append(_install(installer, source, targets, a, assignment))
    return done


def _reported(installer: Any, a: Any, assignment: Any) -> Any:
    """Mark installed adapter ``a`` as reported for ``assignment``'s serial (lock held); returns
    its record when it was not reported for that serial yet, else None."""
    store = AdapterStore(installer.paths)
    state = store.load()
    rec = state.adapters.get(a.name)
    key = f"{assignment.path}#{assignment.serial}"
    if rec is None or rec.version != a.version or rec.extra.get("reported") == key:
        return None
    rec.extra["reported"] = key
    store.save(state)
    return rec


def _report_active(installer: Any, a: Any, assignment: Any) -> None:
    """An assigned adapter already installed: say so once per assignment serial."""
    with installer.lock():
        rec = _reported(installer, a, assignment)
        if rec is not None:
            installer.on_event(
                "adapter.active",
                version=rec.version,
                adapter=rec.name,
                model=f"{rec.base_name}:{rec.name}",
                serial=assignment.serial,
                source=rec.source,
            )


def _refuse(installer: Any, a: Any, reason: str) -> dict:
    from agent.adapters import AdapterInstaller

    with installer.lock():
        AdapterInstaller(installer)._fail(reason, version=a.version, adapter=a.name, event="update.refused")
    return result("update", False, version=a.version, adapter=a.name, reason=reason)


def _base_problem(installer: Any, a: Any, t: TargetInfo) -> str | None:
    """Why the target's base (from its signed custom data) is not what this device runs."""
    from edgellm.adapters import BaseRef

    try:
        base = BaseRef.from_dict(t.custom.get("base")).validate()
    except Exception as e:  # noqa: BLE001 - a malformed base in signed metadata: refuse, say why
        return f"adapter {a.name} {a.version}: its target names no valid base ({message_of(e)})"
    return base_mismatch(installer.paths, a.name, a.version, base)


def _install(installer: Any, source: TufSource, targets: list[TargetInfo], a: Any, assignment: Any) -> dict:
    state = AdapterStore(installer.paths).load()
    have = state.adapters.get(a.name)
    if have is not None and have.version == a.version:
        _report_active(installer, a, assignment)
        return result("update", True, version=a.version, adapter=a.name, reason="up to date")
    if f"{a.name}@{a.version}" in state.rejected:  # failed here before: not downloaded again
        reason = f"adapter {a.name} {a.version} was rejected earlier (failed health check or rolled back)"
        return result("update", False, version=a.version, adapter=a.name, reason=reason)
    profile = installer.config.profile
    cands = [
        t
        for t in targets
        if t.path in a.targets
        and (t.name, t.version) == (a.name, a.version)
        and t.custom.get("kind") == "adapter"
        and profile in t.profiles
    ]
    if not cands:
        return _refuse(
            installer, a, f"adapter {a.name} {a.version}: none of its assigned targets is built for profile {profile}"
        )
    problems = [_base_problem(installer, a, t) for t in cands]
    if None not in problems:
        return _refuse(installer, a, str(problems[0]))
    target = cands[problems.index(None)]
    with installer.lock():
        dl = installer.paths.downloads / "adapter"
        remove_tree(dl)
        dl.mkdir(parents=True)
        try:
            archive = source.download(target, dl)
            res = installer._install_verified(archive, target, source=ASSIGNED, downloaded=archive.stat().st_size)
            _reported(installer, a, assignment)  # its update.installed event says it for this serial
            return res
        except AlreadyCurrent as e:
            return result("update", True, version=a.version, adapter=a.name, reason=message_of(e))
        except AgentError as e:  # recorded and reported by the install path
            return result("update", False, version=a.version, adapter=a.name, reason=message_of(e), hint=e.hint)
        except Exception as e:  # noqa: BLE001 - a download that failed verification or the network
            from agent.adapters import AdapterInstaller

            reason = f"download of {target.path} failed: {message_of(e)}"
            AdapterInstaller(installer)._fail(reason, version=a.version, adapter=a.name)
            return result("update", False, version=a.version, adapter=a.name, reason=reason)
        finally:
            remove_tree(dl)

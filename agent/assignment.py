"""What the fleet assigned this device: the director's signed assignment, checked and applied.

A device installs its *assigned* version, never merely the newest published one. The
assignment is fetched and verified through TUF (:func:`agent.source.fetch_assignment`) whether
the control plane nudged the device over MQTT or the device polls over HTTP; the MQTT payload
itself is never trusted for what to install. A per-device assignment wins over the group's; a
per-device assignment may also move the device to another group (saved in ``config.json``).

Besides TUF's own version checks (an older director metadata is refused), each assignment path
keeps the highest serial this device applied (``assignment.json``): a lower one is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent._fs import atomic_write_json, read_json, remove_tree
from agent.config import AgentConfig, AgentPaths
from agent.errors import InstallError
from agent.schemas import UpdateRequest
from agent.source import TufSource, fetch_assignment

log = logging.getLogger(__name__)


def _seen_path(paths: AgentPaths) -> Any:
    return paths.root / "assignment.json"


def _seen(paths: AgentPaths) -> dict[str, Any]:
    p = _seen_path(paths)
    try:
        d = read_json(p) if p.exists() else {}
    except (OSError, ValueError):
        d = {}
    return d if isinstance(d, dict) else {}


def current(
    paths: AgentPaths, config: AgentConfig, source: TufSource, *, on_group: Callable[[str], None] | None = None
) -> Any:
    """The assignment in force for this device (refreshing the repository first), or None.

    Raises :class:`~agent.errors.InstallError` when an assignment is refused (bad signature,
    replay, malformed); the caller records it as the last update error."""
    dl = paths.downloads / "assignment"
    remove_tree(dl)
    dl.mkdir(parents=True)
    try:
        source.refresh()
        dev = fetch_assignment(source, "device", config.device_id, dl)
        if dev is not None and dev.group and dev.group != config.group:
            log.info("the fleet moved this device from group %s to %s", config.group, dev.group)
            config.group = dev.group
            config.save(paths)
            if on_group is not None:
                on_group(dev.group)
        grp = fetch_assignment(source, "group", config.group, dl)
    except Exception as e:
        from agent.errors import hint_of, message_of

        raise InstallError(
            f"assignment refused: {message_of(e)}",
            hint=hint_of(e) or "the current model keeps serving; check the server",
        ) from e
    finally:
        remove_tree(dl)
    seen = _seen(paths)
    for a in (dev, grp):
        if a is not None and a.serial < int(seen.get(a.path, 0)):
            raise InstallError(
                f"assignment refused: {a.path} serial {a.serial} is older than {seen[a.path]} "
                "applied before (replayed?)",
                hint="the current model keeps serving; check the server",
            )
    eff = dev if dev is not None and dev.version else grp
    if eff is not None:
        seen[eff.path] = max(eff.serial, int(seen.get(eff.path, 0)))
        atomic_write_json(_seen_path(paths), seen)
    return eff


def request_for(assignment: Any) -> UpdateRequest | None:
    """The update an assignment asks for: its version, older ones included (a fleet rollback
    is an assignment too, no device-local flag needed)."""
    if assignment is None or assignment.version is None:
        return None
    return UpdateRequest(model=assignment.model, version=assignment.version, rollback=True, rollout=assignment.rollout)


def check(
    paths: AgentPaths,
    config: AgentConfig,
    source: TufSource,
    installer: Any,
    *,
    on_group: Callable[[str], None] | None = None,
) -> UpdateRequest | None:
    """The update this device's assignment asks for (None: nothing assigned). A refused
    assignment is recorded as the last update error, then raised."""
    return request_for(current_checked(paths, config, source, installer, on_group=on_group))


def current_checked(
    paths: AgentPaths,
    config: AgentConfig,
    source: TufSource,
    installer: Any,
    *,
    on_group: Callable[[str], None] | None = None,
) -> Any:
    """:func:`current`, a refusal recorded as the last update error (and sent as an event)."""
    try:
        return current(paths, config, source, on_group=on_group)
    except InstallError as e:
        installer._fail("update", None, str(e.args[0]) if e.args else "assignment refused")
        raise


def apply(
    paths: AgentPaths,
    config: AgentConfig,
    source: TufSource,
    installer: Any,
    *,
    force: bool = False,
    on_group: Callable[[str], None] | None = None,
) -> dict | None:
    """Install what this device's assignment asks for: the base first (if it is not already
    running), then the adapters it layers on that base (:mod:`agent.adapter_assignment`).
    None: nothing is assigned. A refused assignment or base install raises, as :func:`check`."""
    assigned = current_checked(paths, config, source, installer, on_group=on_group)
    request = request_for(assigned)
    if request is None:
        return None
    res = installer.update(source, request.model_copy(update={"force": force}))
    if not res.get("ok") or not (assigned.adapters or _assigned_adapters(paths)):
        return res  # no base in place: its adapters wait (an adapter needs exactly its base)
    from agent.adapter_assignment import apply as apply_adapters

    done = apply_adapters(installer, source, assigned)
    return {**res, "ok": all(d.get("ok") for d in done), "adapters": done}


def _assigned_adapters(paths: AgentPaths) -> bool:
    from agent.adapter_assignment import ASSIGNED
    from agent.adapters import AdapterStore

    return any(r.source == ASSIGNED for r in AdapterStore(paths).load().adapters.values())


def clear_rejected(installer: Any) -> list[str]:
    """Forget the versions this device rejected (the control plane's ``retry``); returns them."""
    with installer.lock():
        state = installer.store.load()
        cleared, state.rejected = list(state.rejected), []
        installer.store.save(state)
    return cleared


def describe(assignment: Any) -> dict[str, Any] | None:
    """The assignment as `status` shows it."""
    if assignment is None:
        return None
    return {
        "scope": assignment.scope,
        "subject": assignment.subject,
        "serial": assignment.serial,
        "model": assignment.model,
        "version": assignment.version,
        "rollout": assignment.rollout,
        "adapters": [{"name": a.name, "version": a.version} for a in assignment.adapters],
    }

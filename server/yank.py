"""Yanking a version: withdrawn from every assignment, devices on it moved back.

A yanked version stays in the TUF repository (devices may still verify what they run) but no
new assignment or rollout may name it (:meth:`server.director.Director.check_assignable`).
Every assignment naming it goes back to what that group or device was assigned before (the
newest earlier version that is neither the yanked one nor yanked itself); an active rollout of
it rolls back.
"""

from __future__ import annotations

from typing import Any

from edgellm.ids import ID_RULE, valid_id
from server import rollout
from server.director import Change
from server.errors import RolloutError
from server.store import Store


def yank(store: Store, director: Any, model: str, version: str, *, reason: str | None = None) -> list[str]:
    """Withdraw ``model`` ``version``; returns what was moved, one line each."""
    for what, value in (("model", model), ("version", version)):
        if not valid_id(value):
            raise RolloutError(f"{what} {value!r} is not valid", hint=f"use {ID_RULE}")
    store.yank(model, version, reason)
    done = []
    for r in store.rollouts(states=rollout.ACTIVE):
        if (r.model, r.version) == (model, version) and r.state != rollout.RolloutState.ROLLING_BACK:
            rollout.request(store, r.id, "rollback")
            rollout.log(store, r.id, r.state, f"{model} {version} was yanked" + (f": {reason}" if reason else ""))
            done.append(f"rollout {r.id} rolls back")
    changes = []
    for a in director.assignments().values():
        if (a.model, a.version) != (model, version):
            continue
        prev = director.previous_version(a.scope, a.subject, leaving=version)
        if prev is not None and not director.targets_for(prev["model"], prev["version"]):
            prev = None
        changes.append(
            Change(a.scope, a.subject, prev["model"], prev["version"]) if prev else Change(a.scope, a.subject)
        )
        done.append(f"{a.scope} {a.subject} -> {prev['version'] if prev else 'no assignment (nothing earlier)'}")
    director.apply(changes)
    return done

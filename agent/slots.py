"""A/B model slots and the slot pointer (``DIR/state.json``).

The pointer is the only thing that makes a slot current, and it is replaced atomically
(temp + fsync + rename + fsync of the directory). An install only ever writes into the
*inactive* slot and forgets that slot's record before touching its files, so a kill at any
instant leaves the pointer on a complete, verified slot.

After a switch the new slot is *on trial*: every daemon start increments ``trial.boots``; a
daemon that keeps serving for ``trial_commit_s`` commits the trial. If the agent dies
``max_boots`` times before the commit, the next start reverts to the previous slot by itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from agent._fs import atomic_write_json, read_json, remove_tree
from agent.config import AgentPaths
from agent.errors import NoRollbackTarget, SlotIntegrityError
from agent.manifest import verify_slot
from edgellm._record import Record

log = logging.getLogger(__name__)

SLOTS = ("A", "B")
STATE_FORMAT = 1


@dataclasses.dataclass
class SlotRecord(Record):
    """What was verified and installed into a slot."""

    name: str
    version: str
    runtime: str
    manifest_sha256: str
    quantization: str | None = None
    source: str = "offline"  # "offline" (signed envelope) or "tuf" (online update)
    target: str | None = None  # TUF target path
    installed_at: float = 0.0
    health: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Trial(Record):
    slot: str
    previous: str | None
    boots: int = 0
    started_at: float = 0.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class AgentState(Record):
    current: str | None = None
    slots: dict[str, SlotRecord] = dataclasses.field(default_factory=dict)
    trial: Trial | None = None
    last_result: dict[str, Any] | None = None
    rejected: list[str] = dataclasses.field(default_factory=list)  # versions that failed or were rolled back
    format: int = STATE_FORMAT
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> AgentState:
        d = dict(d)
        d["slots"] = {k: SlotRecord.from_dict(v) for k, v in (d.get("slots") or {}).items()}
        d["trial"] = Trial.from_dict(d["trial"]) if d.get("trial") else None
        return super().from_dict(d)

    @property
    def current_record(self) -> SlotRecord | None:
        return self.slots.get(self.current) if self.current else None

    @property
    def inactive(self) -> str:
        return "B" if self.current == "A" else "A"

    @property
    def previous(self) -> str | None:
        other = self.inactive
        return other if other in self.slots else None


def result(action: str, ok: bool, *, version: str | None = None, reason: str | None = None, **extra: Any) -> dict:
    return {"action": action, "ok": ok, "version": version, "reason": reason, "at": time.time(), **extra}


class SlotStore:
    """Reads and atomically replaces the slot pointer. Callers hold the install lock to mutate."""

    def __init__(self, paths: AgentPaths) -> None:
        self.paths = paths

    def load(self) -> AgentState:
        if not self.paths.state.exists():
            return AgentState()
        try:
            return AgentState.from_dict(read_json(self.paths.state))
        except (ValueError, TypeError, AttributeError) as e:
            from agent.errors import AgentError

            raise AgentError(
                f"{self.paths.state} is not a valid slot pointer ({e})",
                hint="it is only ever written atomically by the agent: restore it from a backup, "
                "or delete it and install a bundle again",
            ) from e

    def save(self, state: AgentState) -> None:
        self.paths.state.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.paths.state, state.to_dict())

    def slot_dir(self, slot: str):
        return self.paths.slot_dir(slot)

    def verify(self, state: AgentState, slot: str, *, deep: bool = True) -> Any:
        rec = state.slots.get(slot)
        if rec is None:
            raise SlotIntegrityError(f"slot {slot} holds no installed bundle")
        return verify_slot(self.slot_dir(slot), rec.manifest_sha256, deep=deep)

    # -- transitions (caller holds the install lock) ------------------------------------------

    def switch(self, state: AgentState, slot: str, *, trial: bool = True) -> AgentState:
        previous = state.current
        state.current = slot
        state.trial = Trial(slot=slot, previous=previous, started_at=time.time()) if trial else None
        self.save(state)
        return state

    def count_boot(self, slot: str) -> None:
        """The daemon started serving a trial slot without a restart (hot swap): count that start."""
        state = self.load()
        if state.trial is not None and state.trial.slot == slot and state.current == slot and state.trial.boots == 0:
            state.trial.boots = 1
            self.save(state)

    def commit_trial(self) -> AgentState:
        state = self.load()
        if state.trial is not None:
            log.info("trial committed", extra={"slot": state.trial.slot})
            state.trial = None
            self.save(state)
        return state

    def rollback(
        self, *, reason: str = "rollback requested", action: str = "rollback", reject: bool = True
    ) -> AgentState:
        """Make the previous slot current again (it must still verify). The version left is
        marked rejected unless ``reject`` is false (the fleet assigned the older version: the
        newer one did not fail here)."""
        state = self.load()
        prev = state.trial.previous if state.trial else state.previous
        if not prev or prev not in state.slots:
            raise NoRollbackTarget(
                "there is no previous slot to roll back to",
                hint="install the version you want with `edgellm-agent install FILE`",
            )
        self.verify(state, prev)
        bad = state.current_record
        if reject and bad is not None and bad.version not in state.rejected:
            state.rejected.append(bad.version)
        state.current = prev
        state.trial = None
        state.last_result = result(
            action, True, version=state.slots[prev].version, reason=reason, from_version=bad.version if bad else None
        )
        self.save(state)
        return state

    def boot(self, *, max_boots: int, deep_verify: bool = True) -> AgentState:
        """Run at every daemon start: count the trial boot, revert if needed, prove the slot is whole."""
        state = self.load()
        if state.trial is not None and state.trial.slot == state.current:
            state.trial.boots += 1
            if state.trial.boots > max_boots and state.trial.previous in state.slots:
                log.warning("trial slot did not commit after %d starts: reverting", max_boots)
                return self.rollback(reason=f"new slot failed to commit after {max_boots} starts", action="revert")
            self.save(state)
        if state.current is not None:
            try:
                self.verify(state, state.current, deep=deep_verify)
            except SlotIntegrityError as e:
                log.error("current slot failed verification: %s", e)
                other = state.inactive
                state.slots.pop(state.current, None)
                state.trial = None
                ok_other = False
                if other in state.slots:
                    try:
                        self.verify(state, other, deep=deep_verify)
                        ok_other = True
                    except SlotIntegrityError:
                        state.slots.pop(other, None)
                state.current = other if ok_other else None
                state.last_result = result(
                    "revert",
                    ok_other,
                    reason=f"current slot failed verification: {e}",
                    version=state.slots[other].version if ok_other else None,
                )
                self.save(state)
        self.cleanup_scratch()
        return state

    def cleanup_scratch(self) -> None:
        """Remove leftovers of interrupted installs (staging) — never a slot the pointer names."""
        remove_tree(self.paths.staging)
        for tmp in self.paths.root.glob(".state.json.*.tmp"):  # a write killed before its rename
            tmp.unlink(missing_ok=True)

"""The server's director: what each device and group should run, as signed assignments.

Publishing puts a version in the TUF repository; it reaches no device until the director
assigns it (:mod:`edgellm.trust.director` signs, devices verify). Every assignment change is
one signed director version, logged in the store (so a rollback or a yank can re-assign what a
group ran before), and announced over MQTT: the retained desired-state topics carry it as a
nudge (devices check their signed assignment when it changes), a command nudges a device whose
group moved. Versions that are yanked or not published cannot be assigned.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm import telemetry as wire
from edgellm.trust import Repository
from edgellm.trust.director import (
    AssignedAdapter,
    Assignment,
    assignment_path,
    ensure_director,
    new_assignment,
    read_assignments,
    write_assignments,
)
from server.errors import RolloutError
from server.store import DeviceRow, Store

logger = logging.getLogger(__name__)

Publish = Callable[[str, bytes, bool], None]


@dataclass(frozen=True)
class Change:
    """Assign ``model``/``version`` at ``scope``/``subject``, with LoRA ``adapters`` layered on
    it (:class:`edgellm.trust.director.AssignedAdapter`); ``version`` None clears it."""

    scope: str
    subject: str
    model: str | None = None
    version: str | None = None
    rollout: str | None = None
    adapters: tuple[AssignedAdapter, ...] = ()


class Director:
    def __init__(self, repo_dir: Path, keys_dir: Path, store: Store, publish: Publish | None = None) -> None:
        self.repo = Repository(repo_dir, keys_dir)
        self.store = store
        self.publish = publish
        if ensure_director(self.repo):
            logger.info("director role added to the repository (targets re-signed with the delegation)")

    # -- reading

    def assignments(self) -> dict[str, Assignment]:
        return read_assignments(self.repo)

    def of(self, scope: str, subject: str, current: dict[str, Assignment] | None = None) -> Assignment | None:
        return (current if current is not None else self.assignments()).get(assignment_path(scope, subject))

    def desired(self, device: DeviceRow, current: dict[str, Assignment] | None = None) -> Assignment | None:
        """The assignment in force for ``device``: its own (with a version) or its group's."""
        current = current if current is not None else self.assignments()
        own = self.of("device", device.id, current)
        if own is not None and own.version is not None:
            return own
        return self.of("group", device.group, current)

    def desired_version(self, device: str, group: str, current: dict[str, Assignment] | None = None) -> str | None:
        """The version assigned to ``device`` (its own assignment, else its group's), or None."""
        current = current if current is not None else self.assignments()
        own = self.of("device", device, current)
        if own is not None and own.version is not None:
            return own.version
        g = self.of("group", group, current)
        return g.version if g is not None else None

    def targets_for(self, model: str, version: str) -> list[str]:
        return [
            t.name
            for t in self.repo.list_targets()
            if t.custom.get("edgellm", {}).get("name") == model
            and t.custom.get("edgellm", {}).get("version") == version
        ]

    def check_assignable(self, model: str, version: str) -> list[str]:
        """The published targets of ``model`` ``version``; refuses a yanked or unpublished one."""
        if self.store.is_yanked(model, version):
            raise RolloutError(
                f"{model} {version} is yanked: no assignment may name it",
                hint="publish a fixed version and roll that out",
            )
        targets = self.targets_for(model, version)
        if not targets:
            raise RolloutError(
                f"the repository has no target for {model} {version}: devices could not install it",
                hint="`edgellm-server publish --data-dir DIR BUNDLE` first",
            )
        return targets

    # -- writing

    def apply(self, changes: list[Change]) -> int:
        """Write ``changes`` as one signed director version, log them and nudge the devices.
        Returns the serial (0 when nothing was to be done)."""
        if not changes:
            return 0
        current = self.assignments()
        writes: list[tuple[str, str, Assignment | None]] = []
        for c in changes:
            prev = self.of(c.scope, c.subject, current)
            if c.version is None:
                # a device moved to another group keeps that part of its assignment
                keep = prev is not None and prev.group is not None and c.scope == "device"
                writes.append(
                    (
                        c.scope,
                        c.subject,
                        new_assignment(c.scope, c.subject, model=None, version=None, group=prev.group)
                        if keep and prev
                        else None,
                    )
                )
                continue
            if c.model is None:
                raise RolloutError("an assignment names a model", hint="pass --model")
            targets = self.check_assignable(c.model, c.version)
            writes.append(
                (
                    c.scope,
                    c.subject,
                    new_assignment(
                        c.scope,
                        c.subject,
                        model=c.model,
                        version=c.version,
                        targets=targets,
                        rollout=c.rollout,
                        group=prev.group if prev is not None and c.scope == "device" else None,
                        adapters=c.adapters,
                    ),
                )
            )
        serial = write_assignments(self.repo, writes)
        for c in changes:
            self.store.log_assignment(serial, c.scope, c.subject, c.model, c.version, c.rollout)
            self._nudge(c)
        return serial

    def move_device(self, device: str, group: str) -> None:
        """Put ``device`` in ``group`` without re-provisioning it: a device assignment naming the
        group (the agent saves it in its config), the registry updated, the device nudged."""
        current = self.assignments()
        prev = self.of("device", device, current)
        a = new_assignment(
            "device",
            device,
            model=prev.model if prev else None,
            version=prev.version if prev else None,
            targets=prev.targets if prev else (),
            rollout=prev.rollout if prev else None,
            group=group,
            adapters=prev.adapters if prev else (),
        )
        serial = write_assignments(self.repo, [("device", device, a)])
        self.store.log_assignment(serial, "device", device, a.model, a.version, None)
        self.store.set_device_group(device, group)
        self.nudge_device(device)
        if self.publish is not None:
            self.publish(wire.desired_device_topic(device), b"", True)

    def nudge_device(self, device: str) -> None:
        """Ask ``device`` to check its assignment now (the MQTT command channel)."""
        self.store.queue_command(f"c-{secrets.token_hex(6)}", device, "update", {})

    def version(self) -> int:
        """The snapshot version devices see (the timestamp, written last, names it): it grows with
        every assignment change, and only once the change is complete on disk."""
        return self.repo.timestamp().snapshot_meta.version

    def _nudge(self, c: Change) -> None:
        if self.publish is None:
            # a CLI process has no broker connection: the server's loop re-publishes the group
            # nudges when it sees a new director version; a device is nudged by command
            if c.scope == "device":
                self.nudge_device(c.subject)
            return
        topic = wire.desired_device_topic(c.subject) if c.scope == "device" else wire.desired_group_topic(c.subject)
        if c.version is None or c.model is None:
            self.publish(topic, b"", True)
        else:
            import time

            self.publish(
                topic,
                wire.Desired(model=c.model, version=c.version, rollout=c.rollout, issued_at=time.time()).to_json(),
                True,
            )

    def republish(self, scopes: tuple[str, ...] = ("device", "group")) -> None:
        """Re-send the nudge of every assignment at ``scopes`` (after the broker lost its
        retained messages, or another process changed the assignments)."""
        for a in self.assignments().values():
            if a.version is not None and a.scope in scopes:
                self._nudge(Change(a.scope, a.subject, a.model, a.version, a.rollout))

    def previous_version(self, scope: str, subject: str, leaving: str) -> dict[str, Any] | None:
        """What ``scope``/``subject`` was assigned before, skipping ``leaving`` and yanked versions."""
        for h in self.store.assignment_history(scope, subject):
            if h["version"] and h["version"] != leaving and not self.store.is_yanked(h["model"], h["version"]):
                return {"model": h["model"], "version": h["version"]}
        return None

"""Where each device of a rollout stands against its part of the release, and bytes on the wire.

A device given the full bundle has converged when it reports the rollout's version; a device
given the adapter when it reports the base version and its newest event about that adapter says
the adapter's version is installed (``update.installed``) or was already installed and serves
for a newer assignment (``adapter.active``, sent once per assignment serial); an adapter is
versioned apart from its base and is not part of the device's state message. While rolling
back, such a device is back once that newest event no longer says so (``update.rolled_back``:
the agent dropped the adapter the fleet stopped assigning). Bytes *planned* are the TUF target
lengths of each device's choice; bytes *reported* are what devices say they downloaded
(``bytes_downloaded`` in their ``update.installed`` events for this release since the rollout
began) — a device-sent number, so typed and bounded here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from edgellm import telemetry as wire
from server.store import Choice, RolloutDeviceRow, RolloutRow, Store

MAX_REPORTED_BYTES = 2**40  # a single download over a terabyte is not believed
_HAS_ADAPTER = (str(wire.EventName.UPDATE_INSTALLED), str(wire.EventName.ADAPTER_ACTIVE))
_ADAPTER_EVENTS = (*_HAS_ADAPTER, str(wire.EventName.UPDATE_ROLLED_BACK))


def adapters_on(store: Store, devices: Iterable[str], choices: dict[str, Choice]) -> set[str]:
    """The ``devices`` (given an adapter) whose newest event about that adapter says that
    adapter's version is installed (freshly, or already for a newer assignment)."""
    want = [d for d in devices if d in choices and choices[d].kind == "adapter"]
    newest: dict[str, dict[str, Any]] = {}
    for e in store.events_of(want, _ADAPTER_EVENTS, since=0.0):
        if e.fields.get("adapter") == choices[e.device].adapter:
            newest[e.device] = {**e.fields, "_name": e.name}
    return {
        d for d, f in newest.items() if f["_name"] in _HAS_ADAPTER and f.get("version") == choices[d].adapter_version
    }


def wanted_version(r: RolloutRow, d: str, choices: dict[str, Choice]) -> str:
    """The version ``d`` reports once on its part of the release (an adapter's base, or the release's)."""
    c = choices.get(d)
    return c.version if c is not None and c.kind == "adapter" else r.version


def converged(
    store: Store, r: RolloutRow, devs: Iterable[tuple[str, str | None]], choices: dict[str, Choice]
) -> set[str]:
    """The devices of ``devs`` (id, version it reports) that run their part of the release."""
    there = [d for d, v in devs if v == wanted_version(r, d, choices)]
    on_adapter = adapters_on(store, there, choices)
    return {d for d in there if d not in choices or choices[d].kind != "adapter" or d in on_adapter}


def reported_bytes(store: Store, r: RolloutRow, devices: list[str], choices: dict[str, Choice]) -> dict[str, int]:
    """Per device, the bytes it reported downloading for its part of this release."""
    out: dict[str, int] = {}
    for e in store.events_of(devices, [str(wire.EventName.UPDATE_INSTALLED)], since=r.created):
        n, c = e.fields.get("bytes_downloaded"), choices.get(e.device)
        if type(n) is not int or not 0 <= n <= MAX_REPORTED_BYTES:
            continue
        mine = (
            (e.fields.get("adapter"), e.fields.get("version")) == (c.adapter, c.adapter_version)
            if c is not None and c.kind == "adapter"
            else e.fields.get("adapter") is None and e.fields.get("version") == r.version
        )
        if mine:
            out[e.device] = out.get(e.device, 0) + n
    return out


def summary(store: Store, r: RolloutRow, devs: list[RolloutDeviceRow]) -> dict[str, Any]:
    """Bytes planned (each device's download) against all-full, the adapter/full split, bytes reported."""
    choices = store.rollout_choices(r.id)
    ids = [d.device for d in devs]
    reported = reported_bytes(store, r, ids, choices)
    mine = [choices[d] for d in ids if d in choices]
    return {
        "planned_bytes": sum(c.bytes or 0 for c in mine),
        "adapter_devices": sum(c.kind == "adapter" for c in mine),
        "full_devices": sum(c.kind == "full" for c in mine),
        "adapter_bytes": sum(c.bytes or 0 for c in mine if c.kind == "adapter"),
        "full_bytes": sum(c.bytes or 0 for c in mine if c.kind == "full"),
        "reported_bytes": sum(reported.values()),
        "reporting_devices": len(reported),
        "per_device": {
            d: {"kind": choices[d].kind, "planned_bytes": choices[d].bytes, "reported_bytes": reported.get(d)}
            for d in ids
            if d in choices
        },
    }

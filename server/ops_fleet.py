"""Fleet operations behind the CLI and the API (:mod:`server.ops` style): move a device to
another group, yank a version. Assignment changes made here are signed at once; a process
without a broker connection leaves the nudges to the leader (:mod:`server.director`)."""

from __future__ import annotations

from typing import Any

from edgellm.ids import ID_RULE, valid_id
from server.errors import NotFoundError, ServerError
from server.store import Store


def device_group(data: Any, store: Store, device: str, group: str, publish: Any = None) -> dict[str, Any]:
    for what, value in (("device", device), ("group", group)):
        if not valid_id(value):
            raise ServerError(f"{what} {value!r} is not valid", hint=f"use {ID_RULE}")
    if store.device(device) is None:
        raise NotFoundError(f"no device {device!r}", hint="list devices with `edgellm-server devices`")
    data.director(store, publish).move_device(device, group)
    return {"device": device, "group": group}


def yank(
    data: Any, store: Store, model: str, version: str, reason: str | None = None, publish: Any = None
) -> dict[str, Any]:
    from server.yank import yank as do_yank

    return {
        "model": model,
        "version": version,
        "moved": do_yank(store, data.director(store, publish), model, version, reason=reason),
    }

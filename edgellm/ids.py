"""The one rule for identifiers that travel: device ids, group names, model names and versions.

1 to 128 characters of ``[A-Za-z0-9._-]``, starting with a letter or digit. That keeps an id safe
inside an MQTT topic level, a file name, a TUF target path and a URL path segment, so the same id is
accepted at provisioning, on the wire, by the server and in the repository alike.
"""

from __future__ import annotations

import re
from typing import Any

ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
ID_RE = re.compile(rf"^{ID_PATTERN}$")
ID_RULE = "1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"


def valid_id(value: Any) -> bool:
    """True when ``value`` is a string that follows :data:`ID_RULE`."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def check_id(value: Any, what: str = "id") -> str:
    """Return ``value`` when it is a valid id, else raise :class:`ValueError` naming the rule."""
    if not valid_id(value):
        raise ValueError(f"{what} {value!r} is not valid: use {ID_RULE} (e.g. 'robot-1')")
    return value

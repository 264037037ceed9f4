"""The one duration parser: ``"250ms"``, ``"30s"``, ``"15m"``, ``"12h"``, ``"7d"``, ``"2w"`` or a bare
number of seconds. Used for TUF expiry periods, rollout bakes, timeouts and intervals alike."""

from __future__ import annotations

import math
import re
from datetime import timedelta

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)?\s*$", re.IGNORECASE)
HINT = "write a number with a unit, e.g. 250ms, 30s, 15m, 12h, 7d or 2w"
# Ten years: far past any expiry or bake anyone means, and well inside float and datetime range.
MAX_SECONDS = 10 * 365 * 86400.0


def parse_seconds(text: str | float | int) -> float:
    """Seconds in ``text``. Raises :class:`ValueError` (message says how to write one) when unreadable,
    negative, not finite or over ten years."""
    if isinstance(text, bool):
        raise ValueError(f"duration {text!r} is not understood: {HINT}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _RE.match(str(text))
        if not m:
            raise ValueError(f"duration {text!r} is not understood: {HINT}")
        value = float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]
    if not math.isfinite(value) or value < 0 or value > MAX_SECONDS:
        raise ValueError(f"duration {text!r} is out of range (0 to 10 years): {HINT}")
    return value


def parse_duration(text: str | float | int) -> timedelta:
    """Like :func:`parse_seconds`, as a :class:`~datetime.timedelta`."""
    return timedelta(seconds=parse_seconds(text))

"""A generated corpus in the product's domain: device commands and replies, sensor logs,
robot instructions. Regular enough that a ~2M-parameter model learns it visibly in a minute
(replies copy slots from the request; sensor statuses follow fixed thresholds).

Deterministic: the same ``seed`` always yields the same documents. No download, no torch.
"""

from __future__ import annotations

import random

ROOMS = ("kitchen", "hallway", "garage", "office", "bedroom", "lab", "warehouse", "porch")
DEVICES = {
    "light": ("on", "off"),
    "fan": ("on", "off"),
    "heater": ("on", "off"),
    "pump": ("on", "off"),
    "door": ("open", "closed"),
    "valve": ("open", "closed"),
}
SENSORS = {  # kind: (unit, low, high, warn_above)
    "temp": ("C", 15, 40, 30),
    "humidity": ("%", 20, 90, 70),
    "pressure": ("kPa", 95, 110, 105),
    "battery": ("%", 5, 100, None),
}
COLORS = ("red", "blue", "green", "yellow", "black", "white")
OBJECTS = ("box", "crate", "bottle", "gear", "tray", "cable")
ROBOTS = ("arm-1", "arm-2", "rover-3", "picker-4")


def _device_cmd(r: random.Random) -> str:
    room, dev = r.choice(ROOMS), r.choice(list(DEVICES))
    on, off = DEVICES[dev]
    state = r.choice((on, off))
    verb = {"on": "turn on", "off": "turn off", "open": "open", "closed": "close"}[state]
    return f"<|user|>\n{verb} the {room} {dev}\n<|assistant|>\nOK: {room} {dev} is {state}.\n"


def _device_query(r: random.Random) -> str:
    room, dev = r.choice(ROOMS), r.choice(list(DEVICES))
    state = r.choice(DEVICES[dev])
    return f"<|user|>\nis the {room} {dev} {DEVICES[dev][0]}?\n<|assistant|>\nThe {room} {dev} is {state}.\n"


def _sensor_log(r: random.Random) -> str:
    lines = []
    hh, mm = r.randrange(24), r.randrange(60)
    for _ in range(r.randint(2, 4)):
        kind = r.choice(list(SENSORS))
        unit, lo, hi, warn = SENSORS[kind]
        value = r.randint(lo, hi)
        if warn is None:  # battery: low below 20 %
            status = "low" if value < 20 else "ok"
        else:
            status = "warn" if value > warn else "ok"
        sid = f"{kind[:2]}-{r.randint(1, 9)}"
        lines.append(f"{hh:02d}:{mm:02d} sensor {sid} {kind}={value}{unit} status={status}")
        mm += r.randint(1, 5)
        if mm >= 60:
            hh, mm = (hh + 1) % 24, mm - 60
    return "\n".join(lines) + "\n"


def _robot_task(r: random.Random) -> str:
    robot, color, obj = r.choice(ROBOTS), r.choice(COLORS), r.choice(OBJECTS)
    src, dst = r.randint(1, 9), r.randint(1, 4)
    return (
        f"<|user|>\nrobot {robot}: move the {color} {obj} from bin {src} to belt {dst}\n"
        f"<|assistant|>\n{robot}: going to bin {src}. picked {color} {obj}. placed on belt {dst}. done.\n"
    )


def _status_report(r: random.Random) -> str:
    robot = r.choice(ROBOTS)
    batt = r.randint(5, 100)
    state = "charging" if batt < 20 else "ready"
    return f"<|user|>\nstatus of {robot}?\n<|assistant|>\n{robot}: battery {batt}%, {state}.\n"


_KINDS = (_device_cmd, _device_cmd, _device_query, _sensor_log, _robot_task, _robot_task, _status_report)


def generate_corpus(n_docs: int = 4000, seed: int = 0) -> list[str]:
    """``n_docs`` short documents (each a chat exchange or a log excerpt)."""
    r = random.Random(seed)
    return [r.choice(_KINDS)(r) for _ in range(n_docs)]

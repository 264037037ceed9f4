"""The quickstart's fleet data: each device's local text, held-out perplexity, the fleet table.

The devices' text is regular (one template per device, a few slot values) so that one short
federated round visibly lowers its perplexity; it is unlike the embedded corpus the base model
learned, so there is something to learn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

#: device id -> (profile, template of its local text, slot words)
DEVICES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dev-0": ("rpi4-4gb", "The {c} lamp in room {a} blinks {b} times.", ("red", "green", "amber", "white")),
    "dev-1": ("rpi5-8gb", "Valve {c} on line {a} opens at {b} bar.", ("north", "south", "east", "west")),
    "dev-2": (
        "x86-avx2-laptop-16gb",
        "Order {c} ships from dock {a} in {b} days.",
        ("alpha", "bravo", "delta", "kilo"),
    ),
}
#: held-out share of each device's text (what the device itself keeps apart to measure itself)
VAL_FRACTION = 0.2


def local_text(device: str, n: int = 120) -> list[str]:
    _profile, tpl, words = DEVICES[device]
    return [tpl.format(c=words[i % len(words)], a=i % 5 + 1, b=i % 3 + 2) for i in range(n)]


def write_local_text(directory: Path, device: str) -> list[str]:
    """Write the device's text as `--train-data` reads it; returns its held-out documents."""
    from edgellm.pipeline.data import load_dataset

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "notes.txt").write_text("\n\n".join(local_text(device)) + "\n", encoding="utf-8")
    return list(load_dataset([directory], val_fraction=VAL_FRACTION).val)


def perplexity(kind: str, artifact: Path, texts: list[str], model_dir: Path | None = None) -> float:
    """Perplexity of ``texts`` (one document each) under ``artifact``, through its runtime."""
    import numpy as np

    from edgellm.pipeline.evaluate import compare_logits
    from edgellm.runtime import load_runtime

    nll = tokens = 0.0
    with load_runtime(kind, artifact, model_dir=model_dir, threads=1, context_length=256) as rt:
        for t in texts:
            ids = rt.tokenize(t)
            m = compare_logits(rt.logits(ids)[:-1], np.asarray(ids[1:]))
            nll += m["nll"] * m["eval_tokens"]
            tokens += m["eval_tokens"]
    return math.exp(nll / max(tokens, 1.0))


def target_artifact(repo_dir: Path, model: str, version: str, profile: str, work: Path) -> tuple[str, Path, Path]:
    """The verified artifact of ``model`` ``version`` built for ``profile``: (runtime, artifact, dir)."""
    from edgellm.bundle import unpack
    from edgellm.trust import Repository

    repo = Repository(repo_dir)
    for t in repo.list_targets():
        e = t.custom.get("edgellm", {})
        if e.get("name", model) == model and e.get("version") == version and profile in e.get("profiles", [profile]):
            out = work / f"{version}-{profile}"
            manifest = unpack(repo.target_path(t.name), out)
            return str(manifest.runtime), out / manifest.artifact, out
    raise LookupError(f"no target of {model} {version} for {profile} in {repo_dir}")


def fleet_table(devices: list[dict[str, Any]], ppl: dict[str, dict[str, float]]) -> str:
    """The closing table: device, profile, version, online, held-out perplexity before -> after."""
    rows = [("device", "profile", "version", "online", "held-out ppl v1 -> v2")]
    for d in devices:
        p = ppl.get(d["id"], {})
        change = f"{p['before']:.2f} -> {p['after']:.2f}" if p else "-"
        rows.append(
            (
                d["id"],
                str(d.get("profile") or "-"),
                str(d.get("version") or "-"),
                "yes" if d.get("online") else "no",
                change,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)

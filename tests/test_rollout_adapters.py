"""Rollouts of a release that has adapter bundles beside its full bundles (what a federated run
publishes): each device gets the adapter when it runs exactly the adapter's base artifact, the
full bundle otherwise, and status reports bytes planned (TUF target lengths), the adapter/full
split and the bytes devices reported. Real SQLite store, real TUF repository and director
(assignments signed on disk, read back by ngclient); devices are simulated by their telemetry."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from fixtures_trust import make_bundle_dir

from edgellm import telemetry as wire
from edgellm.errors import EdgeLLMError
from server import rollout
from server.director import Change, Director
from server.rollout import RolloutDriver
from server.store import Store

FULL_BYTES = 256 * 1024
ADAPTER_BYTES = 8 * 1024


def _publish(repo, work, name, version, profile, *, payload, adapter_on=None) -> str:
    """Pack and publish a bundle; ``adapter_on`` (name, version, artifact sha256) makes it an adapter."""
    from edgellm.bundle import pack

    src = make_bundle_dir(
        work / f"src-{name}-{version}-{profile}", name=name, version=version, payload=payload,
        extra={"profiles": [profile]},
    )  # fmt: skip
    if adapter_on is not None:
        os.rename(src / "model.gguf", src / "adapter.gguf")
        m = json.loads((src / "manifest.json").read_text())
        base = {"name": adapter_on[0], "version": adapter_on[1], "runtime": "gguf", "artifact_sha256": adapter_on[2]}
        m.update({"kind": "adapter", "artifact": "adapter.gguf", "base": base})
        (src / "manifest.json").write_text(json.dumps(m))
    return repo.add_bundle(pack(src, work / f"{name}-{version}-{profile}.bundle").path)


@pytest.fixture
def release(tmp_path):
    """tiny 1.0.0 on two profiles (two artifacts), tiny 0.9.0, tiny 1.1.0 full bundles for both
    profiles, and `federated` 1.1.0: an adapter built on the rpi5-8gb artifact of tiny 1.0.0."""
    import hashlib

    from edgellm.trust import Repository, init_keys

    root = init_keys(tmp_path / "keys")
    repo = Repository.create(tmp_path / "repo", tmp_path / "keys")
    base_payload = os.urandom(FULL_BYTES)
    for profile, payload in (("rpi5-8gb", base_payload), ("rpi4-4gb", os.urandom(FULL_BYTES))):
        _publish(repo, tmp_path, "tiny", "1.0.0", profile, payload=payload)
        _publish(repo, tmp_path, "tiny", "1.1.0", profile, payload=os.urandom(FULL_BYTES))
    _publish(repo, tmp_path, "tiny", "0.9.0", "rpi5-8gb", payload=os.urandom(FULL_BYTES))
    base_sha = hashlib.sha256(base_payload).hexdigest()
    _publish(
        repo, tmp_path, "federated", "1.1.0", "rpi5-8gb", payload=os.urandom(ADAPTER_BYTES),
        adapter_on=("tiny", "1.0.0", base_sha),
    )  # fmt: skip
    store = Store(tmp_path / "s.sqlite")
    director = Director(tmp_path / "repo", tmp_path / "keys", store)
    director.apply([Change("group", "g", "tiny", "1.0.0")])
    shutil.copy(root, tmp_path / "root.json")
    return tmp_path, store, director, RolloutDriver(store, director, min_samples=1, update_timeout_s=60)


class Devices:
    def __init__(self, store):
        self.store, self.seq = store, {}

    def send(self, device, kind, body):
        seq = 0 if kind == "birth" else self.seq.setdefault(device, 0) + 1
        self.seq[device] = seq
        self.store.ingest([wire.Envelope(device=device, kind=kind, seq=seq, ts=time.time(), body=body)])

    def birth(self, device, profile, version):
        self.send(
            device, "birth", {"session": "s", "group": "g", "version": version, "model": "tiny", "profile": profile}
        )

    def installed(self, device, version, nbytes, adapter=None):
        fields = {"version": version, "bytes_downloaded": nbytes, **({"adapter": adapter} if adapter else {})}
        self.send(device, "event", {"name": "update.installed", "fields": fields})


def _signed(tmp_path, device):
    """The device's assignment as a device reads it: ngclient against the pinned root."""
    from edgellm.trust import TufClient
    from edgellm.trust.director import fetch_assignment

    repo = tmp_path / "repo"
    c = TufClient(tmp_path / f"cache-{device}", tmp_path / "root.json", repo / "metadata", repo / "targets")
    c.refresh()
    return fetch_assignment(c, "device", device, tmp_path / "dl")


def test_rollout_ships_the_adapter_where_the_base_matches_and_the_full_bundle_elsewhere(release) -> None:
    tmp_path, store, director, drv = release
    devs = Devices(store)
    devs.birth("on-base", "rpi5-8gb", "1.0.0")  # runs exactly the adapter's base artifact
    devs.birth("other-artifact", "rpi4-4gb", "1.0.0")  # same version, another artifact
    devs.birth("older", "rpi5-8gb", "0.9.0")
    rid = rollout.start(
        store, model="tiny", version="1.1.0", group="g", canary="100%", bake="0s", no_gate=True, director=director
    )
    drv.tick()
    a = _signed(tmp_path, "on-base")
    assert (a.model, a.version) == ("tiny", "1.0.0")  # the base it runs, the adapter layered on it
    assert [(x.name, x.version, x.targets) for x in a.adapters] == [
        ("federated", "1.1.0", ("federated-1.1.0-rpi5-8gb.bundle",))
    ]
    for d in ("other-artifact", "older"):
        b = _signed(tmp_path, d)
        assert (b.version, b.adapters) == ("1.1.0", ())
    st = rollout.status(store, rid)[0]
    lengths = {t.name: t.length for t in director.repo.list_targets()}
    w = st["wire"]
    assert (w["adapter_devices"], w["full_devices"]) == (1, 2)
    assert w["adapter_bytes"] == lengths["federated-1.1.0-rpi5-8gb.bundle"]
    assert w["full_bytes"] == lengths["tiny-1.1.0-rpi5-8gb.bundle"] + lengths["tiny-1.1.0-rpi4-4gb.bundle"]
    assert w["planned_bytes"] == w["adapter_bytes"] + w["full_bytes"]
    assert w["adapter_bytes"] * 10 < w["full_bytes"] / 2  # a few KB against a whole model per device
    assert w["reported_bytes"] == 0
    kinds = {d["device"]: (d["kind"], d["converged"]) for d in st["device_states"]}
    assert kinds == {"on-base": ("adapter", False), "other-artifact": ("full", False), "older": ("full", False)}

    # the devices install their part and report what they downloaded
    devs.installed("on-base", "1.1.0", w["adapter_bytes"], adapter="federated")
    for d, p in (("other-artifact", "rpi4-4gb"), ("older", "rpi5-8gb")):
        devs.send(d, "heartbeat", {"version": "1.1.0", "model": "tiny"})
        devs.installed(d, "1.1.0", lengths[f"tiny-1.1.0-{p}.bundle"])
    for _ in range(3):  # canary converged -> bake (0s, no gate) -> full -> completed
        drv.tick()
    st = rollout.status(store, rid)[0]
    assert st["state"] == "completed", st["history"]
    assert "(1 as adapter federated on their base)" in str(st["history"][-1])  # not "all run 1.1.0" alone
    assert st["on_new_version"] == 3 and all(d["converged"] for d in st["device_states"])
    assert st["wire"]["reported_bytes"] == st["wire"]["planned_bytes"]
    # the group's assignment is the full bundle (for devices that join later); the device on the
    # adapter's base keeps the adapter on its base
    assert director.of("group", "g").version == "1.1.0"
    assert _signed(tmp_path, "on-base").adapters[0].name == "federated"
    assert _signed(tmp_path, "older") is None


def test_prefer_full_ships_full_bundles_only_and_a_missing_adapter_is_refused(release) -> None:
    tmp_path, store, director, drv = release
    devs = Devices(store)
    devs.birth("on-base", "rpi5-8gb", "1.0.0")
    with pytest.raises(EdgeLLMError, match="no adapter bundle kitchen 1.1.0"):
        rollout.start(
            store, model="tiny", version="1.1.0", group="g", no_gate=True, director=director, adapter="kitchen"
        )
    rid = rollout.start(
        store, model="tiny", version="1.1.0", group="g", canary="100%", no_gate=True, director=director, prefer="full"
    )
    drv.tick()
    assert _signed(tmp_path, "on-base").adapters == ()
    w = rollout.status(store, rid)[0]["wire"]
    assert (w["adapter_devices"], w["full_devices"]) == (0, 1)


def test_rollout_status_prints_bytes_on_the_wire(release, capsys) -> None:
    from server.cli_fleet import _bytes, echo_rollout

    tmp_path, store, director, drv = release
    Devices(store).birth("on-base", "rpi5-8gb", "1.0.0")
    rid = rollout.start(store, model="tiny", version="1.1.0", group="g", canary="100%", no_gate=True, director=director)
    drv.tick()
    echo_rollout(rollout.status(store, rid)[0], detail=True)  # what `rollout status` prints
    out = capsys.readouterr().out
    n = _bytes(next(t.length for t in director.repo.list_targets() if t.name.startswith("federated")))
    assert f"wire: planned {n} (1 adapter {n}, 0 full 0 B); reported 0 B by 0 devices" in out, out
    assert f"waiting adapter {n}" in out


def _effective(tmp_path, device):
    """What the device's agent applies: its own assignment when it names a version, else its group's."""
    from edgellm.trust import TufClient
    from edgellm.trust.director import fetch_assignment

    own = _signed(tmp_path, device)
    if own is not None and own.version is not None:
        return own
    repo = tmp_path / "repo"
    c = TufClient(tmp_path / f"cache-{device}", tmp_path / "root.json", repo / "metadata", repo / "targets")
    c.refresh()
    return fetch_assignment(c, "group", "g", tmp_path / "dl")


def _complete(store, drv, devs, lengths) -> str:
    """A rollout of tiny 1.1.0 that gave `on-base` the adapter and `older` the full bundle, completed."""
    devs.birth("on-base", "rpi5-8gb", "1.0.0")
    devs.birth("older", "rpi5-8gb", "0.9.0")
    rid = rollout.start(
        store, model="tiny", version="1.1.0", group="g", canary="100%", bake="0s", no_gate=True, director=drv.director
    )
    drv.tick()
    devs.installed("on-base", "1.1.0", lengths["federated-1.1.0-rpi5-8gb.bundle"], adapter="federated")
    devs.send("older", "heartbeat", {"version": "1.1.0", "model": "tiny"})
    devs.installed("older", "1.1.0", lengths["tiny-1.1.0-rpi5-8gb.bundle"])
    for _ in range(3):
        drv.tick()
    assert rollout.status(store, rid)[0]["state"] == "completed"
    return rid


def test_rollback_takes_the_adapter_off_its_base_and_waits_until_the_device_dropped_it(release) -> None:
    tmp_path, store, director, drv = release
    devs = Devices(store)
    lengths = {t.name: t.length for t in director.repo.list_targets()}
    rid = _complete(store, drv, devs, lengths)
    rollout.request(store, rid, "rollback")
    drv.tick()
    # the adapter device: its base, no adapter (its agent drops the adapter, the base keeps serving)
    a = _effective(tmp_path, "on-base")
    assert (a.model, a.version, a.adapters) == ("tiny", "1.0.0", ())
    # the full-bundle device: the version it ran before
    b = _effective(tmp_path, "older")
    assert (b.model, b.version, b.adapters) == ("tiny", "0.9.0", ())
    assert director.of("group", "g").version == "1.0.0"

    devs.send("older", "heartbeat", {"version": "0.9.0", "model": "tiny"})
    drv.tick()
    st = rollout.status(store, rid)[0]
    # on-base reported 1.0.0 all along: that is not "back" while it still serves the adapter
    assert st["state"] == "rolling_back", st["history"]
    devs.send(
        "on-base", "event", {"name": "update.rolled_back", "fields": {"version": "1.1.0", "adapter": "federated"}}
    )
    drv.tick()
    st = rollout.status(store, rid)[0]
    assert st["state"] == "rolled_back", st["history"]
    assert "devices are back on what they ran before" in st["history"][-1]["message"]


def test_rollback_past_the_device_timeout_names_the_device_still_on_the_adapter(release) -> None:
    tmp_path, store, director, drv = release
    devs = Devices(store)
    rid = _complete(store, drv, devs, {t.name: t.length for t in director.repo.list_targets()})
    rollout.request(store, rid, "rollback")
    drv.tick()
    devs.send("older", "heartbeat", {"version": "0.9.0", "model": "tiny"})
    # the rollback began more than the device timeout (60 s) ago
    store.db.execute("UPDATE rollouts SET phase_started=phase_started-3600 WHERE id=?", (rid,))
    drv.tick()
    st = rollout.status(store, rid)[0]
    assert st["state"] == "rolled_back"
    msg = st["history"][-1]["message"]
    assert "not every device came back" in msg and "still on the adapter: on-base" in msg, msg


def test_an_adapter_already_installed_converges_by_its_active_event_when_its_install_event_is_gone(release) -> None:
    """The device installed the adapter long ago (that event pruned): the rollout assigns it, the
    agent finds it installed and says it is active for the new assignment; that converges."""
    tmp_path, store, director, drv = release
    devs = Devices(store)
    devs.birth("on-base", "rpi5-8gb", "1.0.0")
    rid = rollout.start(
        store, model="tiny", version="1.1.0", group="g", canary="100%", bake="0s", no_gate=True, director=director
    )
    drv.tick()
    serial = _signed(tmp_path, "on-base").serial
    drv.tick()
    assert rollout.status(store, rid)[0]["state"] == "canary"  # no event about the adapter: waiting
    fields = {"version": "1.1.0", "adapter": "federated", "serial": serial, "source": "assignment"}
    devs.send("on-base", "event", {"name": "adapter.active", "fields": fields})
    for _ in range(3):
        drv.tick()
    st = rollout.status(store, rid)[0]
    assert st["state"] == "completed", st["history"]
    assert st["wire"]["reported_bytes"] == 0  # nothing was downloaded for it

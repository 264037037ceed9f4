"""Signed assignments that layer LoRA adapters on the assigned base (format v2): the agent
installs the base first, then each adapter through the real install path (TUF verification,
base check, health check in a child process); an adapter the fleet stops assigning is dropped,
one for another base is refused before download, a malformed adapter field refuses the whole
assignment. Real python-tuf repository (adapter_env's, copied), real llama.cpp health checks."""

from __future__ import annotations

import dataclasses
import shutil
from types import SimpleNamespace

import pytest
from fixtures_agent import provision_agent

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


def _targets(repo: Repository, name: str, version: str) -> tuple[str, ...]:
    return tuple(
        sorted(
            t.name
            for t in repo.list_targets()
            if (t.custom["edgellm"]["name"], t.custom["edgellm"]["version"]) == (name, version)
        )
    )


@pytest.fixture
def device(adapter_env, tmp_path):
    """A fresh device (profile test-gguf) and a copy of adapter_env's repository with a director."""
    from agent import assignment
    from agent.config import AgentConfig, AgentPaths
    from agent.install import Installer
    from agent.source import TufSource

    shutil.copytree(adapter_env["repo"], tmp_path / "repo")
    shutil.copytree(adapter_env["keys"], tmp_path / "keys")
    repo = Repository(tmp_path / "repo", tmp_path / "keys")
    ensure_director(repo)
    d = provision_agent(tmp_path / "agent", adapter_env["root"], profile="test-gguf")
    paths = AgentPaths(d)
    cfg = AgentConfig.load(paths)
    events: list[tuple[str, dict]] = []
    installer = Installer(paths, cfg, on_event=lambda kind, **f: events.append((kind, f)))

    def assign(*adapters: tuple[str, str], raw: Assignment | None = None) -> None:
        a = raw or new_assignment(
            "device",
            cfg.device_id,
            model="tiny",
            version="1.0.0",
            targets=_targets(repo, "tiny", "1.0.0"),
            adapters=[AssignedAdapter(n, v, _targets(repo, n, v)) for n, v in adapters],
        )
        write_assignments(repo, [("device", cfg.device_id, a)])

    def apply() -> dict | None:
        return assignment.apply(paths, cfg, TufSource(str(repo.dir), paths.trust_root, paths.tuf_cache), installer)

    def install_offline(key: str) -> dict:
        """Install adapter_env's envelope ``key`` by hand, exported with the copy's metadata."""
        name = adapter_env[key].name.removesuffix(".signed")
        return installer.install_envelope(repo.export_signed(name, tmp_path / adapter_env[key].name))

    return SimpleNamespace(
        repo=repo,
        paths=paths,
        cfg=cfg,
        events=events,
        installer=installer,
        assign=assign,
        apply=apply,
        install_offline=install_offline,
    )


def _served(paths) -> list[str]:
    """What the agent's API serves on the current base (`/v1/models` reads the same)."""
    from agent.adapters import base_artifact_sha256
    from agent.lora_serving import ServedAdapters
    from agent.slots import SlotStore

    state = SlotStore(paths).load()
    return ["tiny"] + [
        f"tiny:{e.name}" for e in ServedAdapters(None, paths, base_artifact_sha256(paths, state)).entries
    ]


def _adapters(paths) -> dict[str, tuple[str, str]]:
    from agent.adapters import AdapterStore

    return {n: (r.version, r.source) for n, r in AdapterStore(paths).load().adapters.items()}


def _running(paths) -> tuple[str, str] | None:
    from agent.slots import SlotStore

    cur = SlotStore(paths).load().current_record
    return (cur.name, cur.version) if cur else None


def test_assignment_with_base_and_adapter_installs_the_base_first_then_serves_model_colon_adapter(device) -> None:
    device.assign(("kitchen", "0.1.0"))
    res = device.apply()
    assert res["ok"] and res["version"] == "1.0.0", res
    assert [(a["adapter"], a["ok"]) for a in res["adapters"]] == [("kitchen", True)]
    installed = [f for kind, f in device.events if kind == "update.installed"]
    assert [(f.get("adapter"), f["version"]) for f in installed] == [(None, "1.0.0"), ("kitchen", "0.1.0")]
    lengths = {t.custom["edgellm"]["name"]: t.length for t in device.repo.list_targets()}
    # what came over the wire, reported per install: the adapter is a small part of the base
    assert [f["bytes_downloaded"] for f in installed] == [lengths["tiny"], lengths["kitchen"]]
    assert _running(device.paths) == ("tiny", "1.0.0")
    assert _adapters(device.paths) == {"kitchen": ("0.1.0", "assignment")}
    assert _served(device.paths) == ["tiny", "tiny:kitchen"]
    again = device.apply()
    assert again["reason"] == "up to date" and again["adapters"][0]["reason"] == "up to date"


def test_adapter_removed_from_the_assignment_is_dropped_local_one_kept_base_keeps_serving(device) -> None:
    from agent.adapters import AdapterStore

    device.assign(("kitchen", "0.1.0"))
    device.apply()
    device.install_offline("garage_envelope")  # installed by hand: not the fleet's
    assert _served(device.paths) == ["tiny", "tiny:garage", "tiny:kitchen"]
    device.assign()  # the fleet rolls the adapter back: the same base, no adapter
    res = device.apply()
    assert res["ok"] and [(a["action"], a["adapter"]) for a in res["adapters"]] == [("rollback", "kitchen")]
    assert _running(device.paths) == ("tiny", "1.0.0")
    assert _adapters(device.paths) == {"garage": ("0.1.0", "offline")}
    assert _served(device.paths) == ["tiny", "tiny:garage"]
    assert not (device.paths.root / "adapters" / "kitchen@0.1.0").exists()
    assert ("update.rolled_back", "kitchen") in [(k, f.get("adapter")) for k, f in device.events]
    assert "kitchen@0.1.0" not in AdapterStore(device.paths).load().rejected  # the fleet may assign it again
    device.assign(("kitchen", "0.1.0"))
    assert device.apply()["ok"] and _served(device.paths) == ["tiny", "tiny:garage", "tiny:kitchen"]


def test_assigned_adapter_for_another_base_is_refused_with_the_reason_device_keeps_serving(device) -> None:
    device.assign(("kitchen", "0.1.0"))
    device.apply()
    device.assign(("kitchen", "0.2.0"))  # built on the Q8_0 artifact; this device runs the F16 one
    device.events.clear()
    res = device.apply()
    assert not res["ok"]
    reason = res["adapters"][0]["reason"]
    assert "adapter kitchen 0.2.0 applies to base tiny 1.0.0" in reason and "but this device runs tiny 1.0.0" in reason
    refused = [f for k, f in device.events if k == "update.refused"]
    assert [(f["adapter"], f["version"], f["reason"]) for f in refused] == [("kitchen", "0.2.0", reason)]
    assert not [k for k, _ in device.events if k in ("update.installed", "update.health_check")]  # nothing fetched
    assert _running(device.paths) == ("tiny", "1.0.0")
    assert _served(device.paths) == ["tiny", "tiny:kitchen"]  # the previous version keeps serving


def _bad(device, adapters: tuple[AssignedAdapter, ...]) -> Assignment:
    good = new_assignment(
        "device", device.cfg.device_id, model="tiny", version="1.0.0", targets=_targets(device.repo, "tiny", "1.0.0")
    )
    return dataclasses.replace(good, adapters=adapters)


BAD_ADAPTERS = {
    "nine adapters": tuple(AssignedAdapter(f"a{i}", "0.1.0") for i in range(9)),
    "target path with a slash": (AssignedAdapter("kitchen", "0.1.0", ("../kitchen.bundle",)),),
    "name not an id": (AssignedAdapter("kitchen/../x", "0.1.0"),),
    "oversized": tuple(AssignedAdapter(f"k{j}", "0.1.0", tuple(f"{i:0>250}" for i in range(16))) for j in range(5)),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_malformed_or_oversized_adapter_field_refuses_the_assignment_device_keeps_serving(device, case) -> None:
    from agent.errors import InstallError
    from agent.slots import SlotStore

    device.install_offline("base_envelope")
    device.assign(raw=_bad(device, BAD_ADAPTERS[case]))
    with pytest.raises(InstallError, match="assignment refused"):
        device.apply()
    assert SlotStore(device.paths).load().last_result["reason"].startswith("assignment refused")
    assert [k for k, _ in device.events][-1] == "update.failed"
    assert _running(device.paths) == ("tiny", "1.0.0") and _adapters(device.paths) == {}


def test_tampered_assignment_bytes_are_refused(device) -> None:
    from agent.errors import InstallError

    device.install_offline("base_envelope")
    device.assign(("kitchen", "0.1.0"))
    blob = next((device.repo.dir / "targets" / "assignments" / "device").glob("*.dev-1.json"))
    blob.write_bytes(blob.read_bytes().replace(b'"kitchen"', b'"garage" '))
    with pytest.raises(InstallError, match="assignment refused"):
        device.apply()
    assert _running(device.paths) == ("tiny", "1.0.0") and _adapters(device.paths) == {}


def _forward(events, store, device: str, first: int = 0) -> None:
    """The agent's events from index ``first`` into the server's store, as its telemetry sends them."""
    import time

    from edgellm import telemetry as wire

    for i, (kind, fields) in enumerate(events[first:], start=first + 1):
        body = {"name": kind, "fields": {k: v for k, v in fields.items() if v is not None}}
        store.ingest([wire.Envelope(device=device, kind="event", seq=i, ts=time.time(), body=body)])


def test_fleet_rollback_drops_the_adapter_base_keeps_serving_and_the_server_sees_it_back(device, tmp_path) -> None:
    """What `rollout rollback` writes for a device that took the adapter: its own assignment
    cleared, the group's assignment the base alone. The agent drops the adapter, keeps the base,
    and the event it sends is what the server's rollback waits for."""
    from server import wire as onwire
    from server.director import Change, Director
    from server.store import Choice, Store

    store = Store(tmp_path / "s.sqlite")
    director = Director(device.repo.dir, tmp_path / "keys", store)
    targets = _targets(device.repo, "kitchen", "0.1.0")
    kitchen = AssignedAdapter("kitchen", "0.1.0", targets)
    dev = device.cfg.device_id
    director.apply([Change("device", dev, "tiny", "1.0.0", "r1", (kitchen,))])  # the rollout's pin
    assert device.apply()["ok"] and _served(device.paths) == ["tiny", "tiny:kitchen"]
    choices = {dev: Choice("adapter", "tiny", "1.0.0", targets[0], 1, "kitchen", "0.1.0")}
    _forward(device.events, store, dev)
    assert onwire.adapters_on(store, [dev], choices) == {dev}

    director.apply([Change("group", device.cfg.group, "tiny", "1.0.0", "r1"), Change("device", dev)])  # rollback
    sent = len(device.events)
    res = device.apply()
    assert res["ok"] and [(a["action"], a["adapter"]) for a in res["adapters"]] == [("rollback", "kitchen")]
    assert _running(device.paths) == ("tiny", "1.0.0") and _served(device.paths) == ["tiny"]
    assert [(k, f.get("adapter")) for k, f in device.events[sent:]] == [("update.rolled_back", "kitchen")]
    _forward(device.events, store, dev, sent)
    assert onwire.adapters_on(store, [dev], choices) == set()  # back: the rollback may finish


def test_an_adapter_already_installed_is_reported_active_once_per_assignment_serial(device) -> None:
    device.assign(("kitchen", "0.1.0"))
    device.apply()
    assert not [k for k, _ in device.events if k == "adapter.active"]  # its install event says it
    device.apply()  # a poll of the same assignment: nothing new to say
    assert not [k for k, _ in device.events if k == "adapter.active"]
    device.events.clear()  # (the server pruned its history)
    device.assign(("kitchen", "0.1.0"))  # a new rollout assigns it again: a new serial
    res = device.apply()
    assert res["adapters"][0]["reason"] == "up to date"
    serial = read_assignments(device.repo)[assignment_path("device", device.cfg.device_id)].serial
    active = [f for k, f in device.events if k == "adapter.active"]
    assert active == [
        {"version": "0.1.0", "adapter": "kitchen", "model": "tiny:kitchen", "serial": serial, "source": "assignment"}
    ]
    assert not [k for k, _ in device.events if k in ("update.installed", "update.health_check")]  # no download
    device.apply()
    assert len([k for k, _ in device.events if k == "adapter.active"]) == 1

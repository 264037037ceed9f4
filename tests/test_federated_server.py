"""Federated fine-tuning, server side: the ServerApp's strategy on real Flower Message objects,
the privacy ledger, the run driver (invitations, min-devices), and the `fl` commands.

Devices are off-machine: here their replies are Flower Messages built by the test (the
multi-process run with SuperNodes is the slow end-to-end test)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.serverapp import Grid

from edgellm import telemetry as wire
from server.app import DataDir
from server.cli import main as server_cli
from server.federated import privacy
from server.federated.driver import FlDriver, parse_invite_reply
from server.federated.server_app import run_dir, run_federated
from server.federated.store import FlStore, RunSettings, status
from server.federated.strategy import EdgeFedAvg, RunFailed

SHAPES = {"model.layers.0.self_attn.q_proj.lora_A": (2, 4), "model.layers.0.self_attn.q_proj.lora_B": (4, 2)}


def reply(
    node: int,
    device: str,
    arrays: dict[str, np.ndarray] | None,
    n: int = 10,
    *,
    loss: float = 2.0,
    decline: str = "",
    phase: str = "train",
    sha: str = "ab" * 32,
) -> Message:
    """A device's reply as the SuperLink hands it to the ServerApp."""
    metrics: dict = {"num-examples": n}
    if phase == "train":
        metrics.update({"train-loss": loss, "heldout-loss-before": loss + 0.5, "heldout-loss-after": loss + 0.1})
    else:
        metrics["heldout-loss"] = loss
    content = RecordDict(
        {
            "metrics": MetricRecord(metrics),
            "device": ConfigRecord({"device-id": device, "data-sha256": sha, "decline-reason": decline}),
        }
    )
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    md = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=phase,
    )
    return make_message(md, content=content)


def lost(node: int, to: str = "") -> Message:
    """What the SuperLink returns for a message (id ``to``) whose SuperNode went away."""
    md = Metadata(
        run_id=1,
        message_id="",
        src_node_id=0,
        dst_node_id=0,
        reply_to_message_id=to,
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return make_message(md, error=Error(code=5, reason="Error: Node Unavailable"))


def adapters(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}


def strategy(**kw) -> EdgeFedAvg:
    reports: list = []
    s = EdgeFedAvg(expected=SHAPES, min_replies=kw.pop("min_replies", 2), report=reports.append, **kw)
    s.reports = reports  # type: ignore[attr-defined]
    s.current = ArrayRecord({k: Array(v) for k, v in adapters(0.0).items()})
    return s


# --------------------------------------------------------------------------- strategy


def test_fedavg_weighted_by_num_examples_equals_hand_computed_weighted_mean():
    s = strategy()
    rng = np.random.default_rng(1)
    ups = [{k: rng.normal(size=sh).astype(np.float32) for k, sh in SHAPES.items()} for _ in range(3)]
    ns, losses = [1, 3, 6], [3.0, 2.0, 1.0]
    arrays, metrics = s.aggregate_train(1, [reply(i + 1, f"dev-{i}", ups[i], ns[i], loss=losses[i]) for i in range(3)])
    for k in SHAPES:
        want = sum(n * u[k] for n, u in zip(ns, ups, strict=True)) / sum(ns)
        np.testing.assert_allclose(arrays[k].numpy(), want, rtol=1e-5)
    assert metrics["train-loss"] == pytest.approx(sum(n * x for n, x in zip(ns, losses, strict=True)) / sum(ns))
    rep = s.reports[-1]
    assert [r.device for r in rep.accepted] == ["dev-0", "dev-1", "dev-2"] and not rep.rejected


@pytest.mark.parametrize(
    "bad,reason",
    [
        (
            {
                "model.layers.0.self_attn.q_proj.lora_A": np.ones((2, 5), np.float32),
                "model.layers.0.self_attn.q_proj.lora_B": np.ones((4, 2), np.float32),
            },
            "shape",
        ),
        (
            {
                "model.layers.0.self_attn.q_proj.lora_A": np.full((2, 4), np.nan, np.float32),
                "model.layers.0.self_attn.q_proj.lora_B": np.ones((4, 2), np.float32),
            },
            "NaN",
        ),
        ({"model.layers.0.self_attn.q_proj.lora_A": np.ones((2, 4), np.float32)}, "missing"),
        ({**adapters(1.0), "lm_head.lora_A": np.ones((2, 4), np.float32)}, "unexpected"),
        ({k: np.ones(s, np.int64) for k, s in SHAPES.items()}, "dtype"),
    ],
)
def test_reply_with_wrong_shape_nan_or_wrong_keys_is_rejected_and_not_averaged(bad, reason):
    s = strategy()
    arrays, _ = s.aggregate_train(
        1, [reply(1, "dev-a", adapters(1.0), 10), reply(2, "dev-b", adapters(3.0), 10), reply(3, "dev-evil", bad, 1000)]
    )
    for k in SHAPES:  # the bad reply, with 100x the weight, left no trace
        np.testing.assert_allclose(arrays[k].numpy(), 2.0)
    rep = s.reports[-1]
    assert [d for d, _ in rep.rejected] == ["dev-evil"] and reason in rep.rejected[0][1]


def test_uninvited_duplicate_and_bad_metrics_replies_are_rejected():
    s = strategy(allowed={"dev-a", "dev-b", "dev-c", "dev-d"})
    bad_metrics = reply(5, "dev-d", adapters(9.0), 10, loss=float("inf"))
    arrays, _ = s.aggregate_train(
        1,
        [
            reply(1, "dev-a", adapters(1.0)),
            reply(2, "dev-b", adapters(3.0)),
            reply(3, "intruder", adapters(50.0)),
            reply(4, "dev-a", adapters(70.0)),
            bad_metrics,
            reply(6, "dev-c", adapters(5.0), n=0),
        ],
    )
    np.testing.assert_allclose(arrays[next(iter(SHAPES))].numpy(), 2.0)
    reasons = dict(s.reports[-1].rejected)
    assert "not invited" in reasons["intruder"] and "second reply" in reasons["dev-a"]
    assert "train-loss" in reasons["dev-d"] and "num-examples" in reasons["dev-c"]


def test_device_killed_mid_round_does_not_stop_the_round_when_enough_remain():
    s = strategy(min_replies=2)
    arrays, _ = s.aggregate_train(1, [reply(1, "dev-a", adapters(1.0)), lost(2), reply(3, "dev-c", adapters(3.0))])
    np.testing.assert_allclose(arrays[next(iter(SHAPES))].numpy(), 2.0)
    assert "no reply" in s.reports[-1].rejected[0][1]


def test_fewer_usable_replies_than_min_devices_fails_the_round():
    s = strategy(min_replies=3)
    with pytest.raises(RunFailed, match="2 usable update"):
        s.aggregate_train(
            1,
            [
                reply(1, "dev-a", adapters(1.0)),
                lost(2),
                reply(3, "dev-c", adapters(3.0)),
                reply(4, "dev-d", None, decline="base-mismatch"),
            ],
        )
    assert s.reports[-1].declined == [("dev-d", "base-mismatch")]


def test_dp_clips_each_update_and_adds_noise_scaled_to_the_largest_weight():
    s = strategy(dp_clip=1.0)  # clipping only: deterministic
    big = {k: np.full(sh, 100.0, np.float32) for k, sh in SHAPES.items()}
    arrays, _ = s.aggregate_train(1, [reply(1, "dev-a", big, 10), reply(2, "dev-b", big, 10)])
    norm = math.sqrt(sum(float((arrays[k].numpy() ** 2).sum()) for k in SHAPES))
    assert norm == pytest.approx(1.0, rel=1e-4)  # each update clipped to C=1, the mean of equal ones too
    s = strategy(dp_clip=0.5, dp_noise=2.0)
    s.aggregate_train(1, [reply(1, "dev-a", adapters(0.1), 10), reply(2, "dev-b", adapters(0.1), 30)])
    rep = s.reports[-1]
    assert rep.noise_std == pytest.approx(2.0 * 0.5 * 0.75)
    # the device with a quarter of the weight gets three times the noise multiplier of the other
    assert rep.noise_multipliers == {"dev-a": pytest.approx(2.0 * 0.75 / 0.25), "dev-b": pytest.approx(2.0)}


# --------------------------------------------------------------------------- ServerApp on a grid of devices


class DeviceGrid(Grid):
    """A Grid whose nodes are in-process stand-ins for devices (``behave(node, message) -> reply``)."""

    def __init__(self, behave: dict[int, Callable[[Message], Message]]) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        self.behave = behave
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what the SuperLink sets

    def set_run(self, run):  # pragma: no cover - not used by the strategy
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *a, **kw):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.behave)

    def get_nodes(self):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for m in messages:  # as Flower's grid does when it pushes them
            m.metadata.__dict__["_message_id"] = m.object_id
        return [self.behave[m.metadata.dst_node_id](m) for m in messages]


def device(name: str, n: int, step: float, *, dies_in_round: int | None = None) -> Callable[[Message], Message]:
    def answer(m: Message) -> Message:
        cfg, rnd = m.content["config"], int(m.content["config"]["server-round"])
        assert cfg["base-version"] == "1.0.0" and cfg["lora-rank"] == 2
        if dies_in_round is not None and rnd >= dies_in_round:
            return lost(m.metadata.dst_node_id, m.metadata.message_id)
        if m.metadata.message_type == "evaluate":
            return reply(m.metadata.dst_node_id, name, None, n, loss=1.5, phase="evaluate")
        new = {k: v.numpy() + step for k, v in m.content["arrays"].items()}
        return reply(m.metadata.dst_node_id, name, new, n, loss=2.0 / rnd, sha=f"{name:0<64}"[:64])

    return answer


@pytest.fixture
def data(tmp_path) -> DataDir:
    return DataDir.init(tmp_path / "srv")


def _accepted_run(fl: FlStore, devices: list[str], **settings) -> str:
    s = RunSettings(**{"rounds": 2, "min_devices": 2, "lora_rank": 2, **settings})
    rid = fl.create(model="tiny", base_version="1.0.0", version="1.1.0", group="lab", settings=s)
    for d in devices:
        fl.set_device(rid, d, "accepted")
    fl.set_state(rid, "running", "test", plan={"base_sha256": "cd" * 32, "merge_target": "x"})
    return rid


def test_server_app_run_records_rounds_devices_ledger_and_saves_the_average(data):
    fl = FlStore(data.store())
    rid = _accepted_run(fl, ["dev-a", "dev-b", "dev-c"], dp_clip=10.0, dp_noise=1.0)
    grid = DeviceGrid(
        {1: device("dev-a", 10, 0.1), 2: device("dev-b", 30, 0.2), 3: device("dev-c", 10, 0.3, dies_in_round=2)}
    )
    out = run_federated(fl, rid, grid, base=(SHAPES, adapters(0.0)))
    run = fl.run(rid)
    assert (
        run["state"] == "aggregated"
        and run["round"] == 2
        and out == run_dir(data.store_path, rid) / "adapters.safetensors"
    )
    from safetensors.numpy import load_file

    assert set(load_file(str(out))) == set(SHAPES)
    st = status(fl, rid)[0]
    devs = {d["device"]: d for d in st["devices"]}
    assert devs["dev-a"]["status"] == "trained" and devs["dev-a"]["rounds"] == 2
    assert devs["dev-c"]["status"] == "lost" and devs["dev-c"]["rounds"] == 1  # killed in round 2: the run went on
    assert "no reply" in devs["dev-c"]["reason"]
    assert [r["replies"] for r in st["rounds_detail"]] == [3, 2]
    assert st["rounds_detail"][0]["heldout_global"] == pytest.approx(1.5)
    assert st["rounds_detail"][1]["train_loss"] == pytest.approx(1.0)
    # ledger: dev-b (3/5 of the weight in round 2) has z=1 both rounds; dev-a gets more noise per unit of influence
    led = {(e["device"], e["round"]): e for e in fl.ledger(run_id=rid)}
    assert led[("dev-b", 2)]["noise_multiplier"] == pytest.approx(1.0)
    assert led[("dev-b", 2)]["epsilon_total"] == pytest.approx(privacy.epsilon([30 / 50 / (30 / 50), 1.0]), rel=1e-6)
    assert fl.epsilon("dev-a") < fl.epsilon("dev-b")


def test_server_app_run_with_too_few_devices_fails_and_saves_nothing(data):
    fl = FlStore(data.store())
    rid = _accepted_run(fl, ["dev-a", "dev-b"], rounds=3)
    grid = DeviceGrid({1: device("dev-a", 10, 0.1), 2: device("dev-b", 10, 0.1, dies_in_round=2)})
    with pytest.raises(RunFailed):
        run_federated(fl, rid, grid, base=(SHAPES, adapters(0.0)))
    assert not (run_dir(data.store_path, rid) / "adapters.safetensors").exists()
    assert fl.run(rid)["state"] == "running"  # main() records the failure; the driver never sees "aggregated"


# --------------------------------------------------------------------------- ledger


def test_ledger_accumulates_epsilon_per_device_across_rounds_and_runs(data):
    fl = FlStore(data.store())
    fl.spend("run-1", 1, {"dev-a": 1.0, "dev-b": 2.0}, 1e-5)
    tot = fl.spend("run-1", 2, {"dev-a": 1.0}, 1e-5)
    tot2 = fl.spend("run-2", 1, {"dev-a": 1.0}, 1e-5)
    assert tot["dev-a"] == pytest.approx(privacy.epsilon([1.0, 1.0]))
    assert tot2["dev-a"] == pytest.approx(privacy.epsilon([1.0] * 3)) and tot2["dev-a"] > tot["dev-a"]
    assert fl.epsilon("dev-b") == pytest.approx(privacy.epsilon([2.0])) and fl.epsilon("dev-b") < fl.epsilon("dev-a")
    assert fl.epsilon("dev-new") == 0.0
    fl.spend("run-3", 1, {"dev-b": 0.0}, 1e-5)  # a round without noise: no guarantee left
    assert math.isinf(fl.epsilon("dev-b")) and math.isinf(fl.ledger(device="dev-b")[-1]["epsilon_total"])


# --------------------------------------------------------------------------- the driver


def _publish_base(data: DataDir, tmp_path: Path, profile: str = "rpi5-8gb", quant: str = "q8_0") -> None:
    from fixtures_trust import make_bundle_dir

    from edgellm.bundle import pack
    from edgellm.trust import Repository

    src = make_bundle_dir(
        tmp_path / f"b-{profile}", name="tiny", version="1.0.0", extra={"profiles": [profile], "quantization": quant}
    )
    Repository(data.repo, data.keys).add_bundle(pack(src, tmp_path / f"tiny-1.0.0-{profile}.bundle").path)


def _birth(store, dev: str, group: str = "lab", profile: str = "rpi5-8gb") -> None:
    store.ingest(
        [
            wire.Envelope(
                device=dev,
                kind="birth",
                seq=0,
                ts=time.time(),
                body=wire.Birth(session="s", profile=profile, group=group).to_dict(),
            )
        ]
    )


class FakeSuperLink:
    address = "127.0.0.1:9092"
    home = Path("/nonexistent")

    def __init__(self) -> None:
        self.submitted: list[dict] = []

    def supervise(self) -> None:
        pass

    def ready(self) -> bool:
        return True

    def submit(self, run_config: dict) -> str:
        self.submitted.append(run_config)
        return "4242"

    def run_status(self, run: str) -> str:
        return "running"


def _driver(data: DataDir) -> tuple[FlDriver, list, FakeSuperLink]:
    sent: list = []
    link = FakeSuperLink()
    drv = FlDriver(data.store(), data.root, lambda t, p, r: sent.append((t, json.loads(p))), link)  # type: ignore[arg-type]
    return drv, sent, link


def _answer(store, dev: str, cid: str, accepted: bool, reason: str = "", seq: int = 1) -> None:
    body = {"id": cid, "name": "fl_invite", "ok": True, "result": {"accepted": accepted, "reason": reason}}
    store.ingest([wire.Envelope(device=dev, kind="reply", seq=seq, ts=time.time(), body=body, epoch="e")])


def test_driver_invites_eligible_devices_and_submits_when_enough_accept(data, tmp_path):
    _publish_base(data, tmp_path)
    store = data.store()
    for d in ("dev-a", "dev-b", "dev-c"):
        _birth(store, d)
    _birth(store, "dev-off")
    store.db.execute("UPDATE devices SET online=0 WHERE id='dev-off'")
    drv, sent, link = _driver(data)
    fl = drv.fl
    rid = fl.create(
        model="tiny",
        base_version="1.0.0",
        version="1.1.0",
        group="lab",
        settings=RunSettings(min_devices=2, invite_timeout_s=3600),
    )
    drv.tick()
    invites = {t.rsplit("/", 1)[1]: p for t, p in sent if p["name"] == "fl_invite"}
    assert sorted(invites) == ["dev-a", "dev-b", "dev-c"]
    assert invites["dev-a"]["args"]["run_id"] == rid and len(invites["dev-a"]["args"]["base_sha256"]) == 64
    _answer(store, "dev-a", invites["dev-a"]["id"], True)
    _answer(store, "dev-b", invites["dev-b"]["id"], False, "no-train-data")
    drv.tick()
    assert fl.run(rid)["state"] == "inviting"  # dev-c has not answered yet
    _answer(store, "dev-c", invites["dev-c"]["id"], True)
    drv.tick()
    run = fl.run(rid)
    assert run["state"] == "running" and run["flower_run"] == "4242"
    assert link.submitted == [{"edgellm-run-id": rid, "edgellm-store": str(data.store_path)}]
    st = status(fl, rid)[0]
    assert {d["device"] for d in st["participating"]} == {"dev-a", "dev-c"}
    assert {(d["device"], d["reason"]) for d in st["declining"]} == {("dev-b", "no-train-data"), ("dev-off", "offline")}


def test_min_devices_not_reached_fails_the_run_and_publishes_nothing(data, tmp_path):
    from edgellm.trust import Repository

    _publish_base(data, tmp_path)
    store = data.store()
    for d in ("dev-a", "dev-b"):
        _birth(store, d)
    drv, sent, link = _driver(data)
    rid = drv.fl.create(
        model="tiny",
        base_version="1.0.0",
        version="1.1.0",
        group="lab",
        settings=RunSettings(min_devices=2, invite_timeout_s=0.01),
    )
    drv.tick()
    invites = {t.rsplit("/", 1)[1]: p for t, p in sent if p["name"] == "fl_invite"}
    _answer(store, "dev-a", invites["dev-a"]["id"], True)
    time.sleep(0.05)
    drv.tick()  # dev-b never answers: one acceptance, two needed
    run = drv.fl.run(rid)
    assert run["state"] == "failed" and "1 device(s) accepted, the run needs 2" in run["reason"]
    assert link.submitted == []
    assert any(p["name"] == "fl_stop" and t.endswith("/dev-a") for t, p in sent)
    assert [t.custom["edgellm"]["version"] for t in Repository(data.repo).list_targets()] == ["1.0.0"]
    assert store.db.execute("SELECT COUNT(*) FROM rollouts").fetchone()[0] == 0


def test_max_epsilon_excludes_devices_whose_ledger_would_pass_it(data, tmp_path):
    _publish_base(data, tmp_path)
    store = data.store()
    for d in ("dev-a", "dev-b", "dev-c"):
        _birth(store, d)
    drv, sent, _ = _driver(data)
    drv.fl.spend("old-run", 1, {"dev-a": 0.5}, 1e-5)  # dev-a already spent a lot
    s = RunSettings(rounds=2, min_devices=2, dp_noise=2.0, dp_clip=1.0, max_epsilon=5.0)
    assert privacy.epsilon([2.0, 2.0]) < 5.0 < privacy.epsilon([0.5, 2.0, 2.0])
    rid = drv.fl.create(model="tiny", base_version="1.0.0", version="1.1.0", group="lab", settings=s)
    drv.tick()
    assert sorted(t.rsplit("/", 1)[1] for t, p in sent if p["name"] == "fl_invite") == ["dev-b", "dev-c"]
    dev_a = next(d for d in drv.fl.devices(rid) if d["device"] == "dev-a")
    assert dev_a["status"] == "excluded" and "--max-epsilon 5" in dev_a["reason"]


@pytest.mark.parametrize(
    "body,want",
    [
        ({"id": "c", "ok": True, "result": {"accepted": True, "reason": ""}}, (True, "")),
        ({"id": "c", "ok": True, "result": {"accepted": False, "reason": "no-train-data"}}, (False, "no-train-data")),
        (
            {"id": "c", "ok": False, "error": "unknown command 'fl_invite'"},
            (False, "agent error: unknown command 'fl_invite'"),
        ),
        ({"id": "c", "ok": True, "result": {"accepted": "yes"}}, (False, "malformed reply (no 'accepted')")),
        ({"id": "c", "ok": True, "result": {"accepted": False, "reason": "x" * 5000}}, (False, "x" * 200)),
        ("not an object", (False, "malformed reply")),
    ],
)
def test_invite_replies_are_typed_and_bounded(body, want):
    assert parse_invite_reply(body) == want


def test_too_few_eligible_devices_fails_before_inviting(data, tmp_path):
    _publish_base(data, tmp_path)
    store = data.store()
    _birth(store, "dev-a")
    _birth(store, "dev-pi4", profile="rpi4-4gb")  # no bundle of the base for its profile
    drv, sent, _ = _driver(data)
    rid = drv.fl.create(
        model="tiny", base_version="1.0.0", version="1.1.0", group="lab", settings=RunSettings(min_devices=2)
    )
    drv.tick()
    assert drv.fl.run(rid)["state"] == "failed" and sent == []
    assert (
        "no bundle of the base for profile 'rpi4-4gb'"
        in {d["device"]: d["reason"] for d in drv.fl.devices(rid)}["dev-pi4"]
    )


# --------------------------------------------------------------------------- CLI


def test_fl_start_and_status_json_on_a_data_dir(data, tmp_path):
    _publish_base(data, tmp_path)
    cli = CliRunner()
    r = cli.invoke(
        server_cli,
        [
            "fl",
            "start",
            "--data-dir",
            str(data.root),
            "--model",
            "tiny",
            "--version",
            "1.0.0",
            "--group",
            "lab",
            "--rounds",
            "2",
            "--min-devices",
            "2",
            "--publish",
            "1.1.0",
            "--dp-noise",
            "1.0",
            "--dp-clip",
            "0.5",
            "--max-epsilon",
            "8",
            "--no-rollout",
            "--format",
            "json",
        ],
    )
    assert r.exit_code == 0, r.output
    rid = json.loads(r.output)["id"]
    r = cli.invoke(server_cli, ["fl", "status", "--data-dir", str(data.root), rid, "--format", "json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)[0]
    assert st["state"] == "pending" and st["rounds"] == 2 and st["version"] == "1.1.0"
    assert (
        st["settings"]["dp_noise"] == 1.0
        and st["settings"]["max_epsilon"] == 8.0
        and st["settings"]["rollout"] is False
    )
    r = cli.invoke(server_cli, ["fl", "status", "--data-dir", str(data.root), rid])
    assert r.exit_code == 0 and f"{rid}  tiny 1.0.0 -> 1.1.0 on lab: pending" in r.output
    # a second run while one is active, an unpublished base, bad DP settings: refused with a hint, nothing recorded
    for args, says in ((["--version", "1.0.0"], "still active"), (["--version", "9.9.9"], "no bundle of tiny 9.9.9")):
        r = cli.invoke(
            server_cli,
            ["fl", "start", "--data-dir", str(data.root), "--model", "tiny", *args, "--publish", "2.0.0", "--no-gate"],
        )
        assert r.exit_code != 0 and says in r.output and "hint" in r.output
    FlStore(data.store()).fail(rid, "test")
    r = cli.invoke(
        server_cli,
        [
            "fl",
            "start",
            "--data-dir",
            str(data.root),
            "--model",
            "tiny",
            "--version",
            "1.0.0",
            "--publish",
            "2.0.0",
            "--dp-noise",
            "1",
            "--no-gate",
        ],
    )
    assert r.exit_code != 0 and "--dp-clip" in r.output
    assert (
        len(
            json.loads(
                cli.invoke(server_cli, ["fl", "status", "--data-dir", str(data.root), "--format", "json"]).output
            )
        )
        == 1
    )


def test_fl_status_wait_exits_nonzero_when_the_run_failed(data, tmp_path):
    _publish_base(data, tmp_path)
    fl = FlStore(data.store())
    rid = fl.create(model="tiny", base_version="1.0.0", version="1.1.0", group="lab", settings=RunSettings())
    fl.fail(rid, "2 device(s) accepted, the run needs 3")
    r = CliRunner().invoke(server_cli, ["fl", "status", "--data-dir", str(data.root), rid, "--wait"])
    assert r.exit_code == 1 and "the run needs 3" in r.output


# --------------------------------------------------------------------------- the SuperLink


def test_superlink_is_started_answers_is_restarted_after_a_crash_and_stopped(tmp_path):
    import os
    import signal
    import socket

    from server.federated.superlink import SuperLink

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    link = SuperLink(tmp_path / "flwr", f"127.0.0.1:{port}")
    link.start()
    try:
        assert {"--disable-runtime-dependency-installation", "--insecure"} <= set(link.proc.args)
        deadline = time.monotonic() + 60
        while not link.ready(probe_every_s=0.5):
            assert time.monotonic() < deadline, (tmp_path / "flwr" / "superlink.log").read_text()[-2000:]
            time.sleep(0.5)
        assert f'address = "127.0.0.1:{port}"' in (tmp_path / "flwr" / "config.toml").read_text()
        first = link.proc.pid
        os.killpg(first, signal.SIGKILL)
        link.proc.wait(10)
        assert not link.ready()
        link._next_start = 0.0
        link.supervise()
        assert link.alive() and link.proc.pid != first and link.restarts == 1
    finally:
        proc = link.proc
        link.stop()
    assert proc is not None and proc.poll() is not None


def test_server_tells_devices_the_advertised_superlink_address_and_refuses_a_malformed_one(data):
    from edgellm.telemetry import MqttConfig
    from server.app import Server
    from server.federated.superlink import SuperLinkError

    srv = Server(
        data.root, MqttConfig("mqtt://127.0.0.1:1"), http_port=0, fl="127.0.0.1:9092", fl_advertise="fl.example.net:443"
    )
    assert srv.fl is not None and srv.fl.advertise == "fl.example.net:443"
    assert (
        Server(data.root, MqttConfig("mqtt://127.0.0.1:1"), http_port=0, fl="127.0.0.1:9092").fl.advertise
        == "127.0.0.1:9092"
    )
    with pytest.raises(SuperLinkError, match="--fl-advertise"):
        Server(data.root, MqttConfig("mqtt://127.0.0.1:1"), http_port=0, fl="127.0.0.1:9092", fl_advertise="nope")

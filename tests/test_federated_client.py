"""The device's Flower ClientApp, called with Flower's own Message/RecordDict/Context (no processes).

An agent dir with a real GGUF slot (the tiny Q8_0 or F16 model, unpacked from a bundle as the
installer does) and a directory of local text; the server's messages are built as the ServerApp
builds them.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict  # noqa: E402

from agent.config import AgentConfig, AgentPaths  # noqa: E402
from agent.federated import client_app  # noqa: E402
from agent.manifest import manifest_sha256  # noqa: E402
from agent.slots import AgentState, SlotRecord, SlotStore  # noqa: E402
from edgellm.bundle import pack, unpack  # noqa: E402
from edgellm.pipeline import lora  # noqa: E402
from edgellm.pipeline.gguf_load import _reader, gguf_config  # noqa: E402

DEVICE = "dev-7"
SECRET_WORDS = ("zanzibar", "quokka", "marmalade")
RANK, ALPHA = 4, 8.0


def private_text(n: int = 150) -> list[str]:
    """Regular text the base never saw, with words that must never appear in a reply."""
    return [f"The {SECRET_WORDS[i % 3]} lamp in room {i % 4} blinks {i % 3 + 1} times." for i in range(n)]


def make_agent(
    root: Path,
    artifact: Path | None,
    *,
    runtime: str = "gguf",
    quantization: str = "q8_0",
    data: list[str] | None = None,
) -> AgentPaths:
    """A provisioned-looking agent dir whose current slot holds ``artifact``."""
    paths = AgentPaths(root)
    paths.ensure_dirs()
    train_dir = None
    if data is not None:
        train_dir = root.parent / f"{root.name}-text"
        train_dir.mkdir()
        (train_dir / "notes.txt").write_text("\n\n".join(data[: len(data) // 2]) + "\n", encoding="utf-8")
        (train_dir / "more.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in data[len(data) // 2 :]), encoding="utf-8"
        )
    AgentConfig(device_id=DEVICE, profile="rpi4-4gb", train_data=str(train_dir) if train_dir else None).save(paths)
    src = root.parent / f"{root.name}-bundle-src"
    src.mkdir()
    name = "model.gguf" if runtime == "gguf" else "model.onnx"
    if artifact is not None:
        (src / name).write_bytes(artifact.read_bytes())
    else:
        (src / name).write_bytes(b"not really a model")
    (src / "manifest.json").write_text(
        json.dumps(
            {
                "name": "tiny",
                "version": "1.0.0",
                "runtime": runtime,
                "artifact": name,
                "quantization": quantization,
                "profiles": ["rpi4-4gb"],
                "memory": {"context_length": 256},
            }
        )
    )
    bundle = pack(src, root.parent / f"{root.name}.bundle").path
    unpack(bundle, paths.slot_dir("A"))
    SlotStore(paths).save(
        AgentState(
            current="A",
            slots={
                "A": SlotRecord(
                    name="tiny",
                    version="1.0.0",
                    runtime=runtime,
                    manifest_sha256=manifest_sha256(paths.slot_dir("A")),
                    quantization=quantization,
                )
            },
        )
    )
    return paths


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def server_message(
    kind: str,
    gguf: Path,
    *,
    base_sha256: str | None = None,
    steps: int = 20,
    dp_clip: float = 0.0,
    arrays: dict | None = None,
) -> Message:
    cfg = gguf_config(_reader(gguf))
    state = arrays if arrays is not None else lora.initial_lora_state(cfg, lora.LoraConfig(RANK, ALPHA), seed=0)
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "config": ConfigRecord(
                {
                    "run-id": "run-1",
                    "server-round": 1,
                    "lora-rank": RANK,
                    "lora-alpha": ALPHA,
                    "local-steps": steps,
                    "lr": 3e-3,
                    "base-version": "1.0.0",
                    "base-sha256": base_sha256 or sha256(gguf),
                    "dp-clip": dp_clip,
                    "seed": 0,
                }
            ),
        }
    )
    meta = Metadata(
        run_id=1,
        message_id="m-1",
        src_node_id=0,
        dst_node_id=11,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=meta)


def context(paths: AgentPaths) -> Context:
    return Context(
        run_id=1,
        node_id=11,
        node_config={"device-id": DEVICE, "agent-dir": str(paths.root)},
        state=RecordDict(),
        run_config={},
    )


def serialized(reply: Message) -> bytes:
    """Every object of the reply as the SuperNode sends it: the message and all nested records,
    arrays and chunks, each deflated by Flower."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return b"".join(o.deflate() for o in get_all_nested_objects(reply).values())


@pytest.fixture(scope="module")
def gguf_agent(tmp_path_factory, tiny_gguf) -> AgentPaths:
    return make_agent(tmp_path_factory.mktemp("fl") / "agent", tiny_gguf, data=private_text())


def test_train_replies_with_only_adapters_metrics_and_device_record(gguf_agent, tiny_gguf) -> None:
    msg = server_message("train", tiny_gguf)
    reply = client_app.app(msg, context(gguf_agent))

    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "metrics", "device"}
    dev = reply.content["device"]
    assert dev["device-id"] == DEVICE and dev["decline-reason"] == "" and len(dev["data-sha256"]) == 64
    cfg = gguf_config(_reader(tiny_gguf))
    update = reply.content["arrays"].to_torch_state_dict()
    assert {k: tuple(v.shape) for k, v in update.items()} == lora.expected_shapes(cfg, lora.LoraConfig(RANK, ALPHA))
    assert all(torch.isfinite(v).all() for v in update.values())
    assert any(v.abs().sum() > 0 for k, v in update.items() if k.endswith("lora_B"))  # it trained
    m = reply.content["metrics"]
    assert set(m.keys()) == {"num-examples", "train-loss", "heldout-loss-before", "heldout-loss-after"}
    assert m["num-examples"] > 0
    assert m["heldout-loss-after"] < m["heldout-loss-before"]
    assert reply.metadata.reply_to_message_id == "m-1" and reply.metadata.dst_node_id == 0

    blob = serialized(reply)
    assert DEVICE.encode() in blob and dev["data-sha256"].encode() in blob  # the search sees the records
    for word in SECRET_WORDS + ("blinks times", "lamp in room"):
        assert word.encode() not in blob
    for line in private_text()[:10]:
        assert line.encode() not in blob and line.encode("utf-16-le") not in blob


def test_evaluate_reports_heldout_loss_of_the_global_adapters(gguf_agent, tiny_gguf) -> None:
    reply = client_app.app(server_message("evaluate", tiny_gguf), context(gguf_agent))
    assert set(reply.content.keys()) == {"metrics", "device"}
    m = reply.content["metrics"]
    assert m["num-examples"] > 0 and m["heldout-loss"] > 0
    assert reply.content["device"]["decline-reason"] == ""


def test_update_is_clipped_to_dp_clip_around_the_global_adapters(gguf_agent, tiny_gguf) -> None:
    msg = server_message("train", tiny_gguf, dp_clip=0.01, steps=5)
    sent = msg.content["arrays"].to_torch_state_dict()
    reply = client_app.app(msg, context(gguf_agent))
    got = reply.content["arrays"].to_torch_state_dict()
    norm = sum(float(((got[k] - sent[k]).double() ** 2).sum()) for k in sent) ** 0.5
    assert 0 < norm <= 0.01 + 1e-6


def test_f16_device_takes_part(tmp_path, tiny_gguf_f16) -> None:
    paths = make_agent(tmp_path / "agent", tiny_gguf_f16, quantization="f16", data=private_text(60))
    reply = client_app.app(server_message("train", tiny_gguf_f16, steps=3), context(paths))
    assert reply.content["device"]["decline-reason"] == ""
    assert "arrays" in reply.content


def _declined(reply: Message) -> str:
    assert "arrays" not in reply.content
    assert reply.content["metrics"]["num-examples"] == 0
    return str(reply.content["device"]["decline-reason"])


def test_onnx_device_declines(tmp_path, tiny_gguf) -> None:
    paths = make_agent(tmp_path / "agent", None, runtime="onnx", quantization="int8", data=private_text(20))
    assert _declined(client_app.app(server_message("train", tiny_gguf), context(paths))) == "runtime-onnx"


def test_device_without_data_declines(tmp_path, tiny_gguf) -> None:
    paths = make_agent(tmp_path / "agent", tiny_gguf, data=None)
    assert _declined(client_app.app(server_message("train", tiny_gguf), context(paths))) == "no-train-data"
    assert _declined(client_app.app(server_message("evaluate", tiny_gguf), context(paths))) == "no-train-data"


def test_device_on_another_base_declines(gguf_agent, tiny_gguf) -> None:
    reply = client_app.app(server_message("train", tiny_gguf, base_sha256="0" * 64), context(gguf_agent))
    assert _declined(reply) == "base-mismatch"


def test_adapters_of_the_wrong_shape_are_refused(gguf_agent, tiny_gguf) -> None:
    reply = client_app.app(
        server_message("train", tiny_gguf, arrays={"layers.0.self_attn.q_proj.lora_A": torch.zeros(RANK, 3)}),
        context(gguf_agent),
    )
    assert _declined(reply) == "bad-request"


def test_bad_config_values_are_refused(gguf_agent, tiny_gguf) -> None:
    msg = server_message("train", tiny_gguf)
    msg.content["config"]["local-steps"] = 10**9
    assert _declined(client_app.app(msg, context(gguf_agent))) == "bad-request"

"""Device data for federated fine-tuning: `provision --train-data`, `--learn-from-use` (the user's
messages only, capped, wipeable) and what the ClientApp reads from them. No torch needed."""

from __future__ import annotations

import json

import pytest
from fixtures_agent import agent_cli

from agent.config import AgentConfig, AgentPaths
from agent.federated import device, learn


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    (d / "a.txt").write_text("The pump starts at dawn.\n\nThe valve closes at dusk.\n")
    (d / "b.jsonl").write_text(json.dumps({"text": "The fan spins slowly."}) + "\n")
    return d


def test_provision_records_train_data_and_learn_from_use(tmp_path, keys_dir, text_dir) -> None:
    data_dir = tmp_path / "agent"
    agent_cli(
        "provision",
        "--device-id",
        "d1",
        "--profile",
        "rpi4-4gb",
        "--root",
        str(keys_dir / "root.json"),
        "--train-data",
        str(text_dir),
        "--learn-from-use",
        data_dir=data_dir,
    )
    cfg = AgentConfig.load(AgentPaths(data_dir))
    assert cfg.train_data == str(text_dir.absolute()) and cfg.learn_from_use is True

    plain = tmp_path / "plain"
    agent_cli(
        "provision", "--device-id", "d2", "--profile", "rpi4-4gb", "--root", str(keys_dir / "root.json"), data_dir=plain
    )
    cfg = AgentConfig.load(AgentPaths(plain))
    assert cfg.train_data is None and cfg.learn_from_use is False  # both off by default

    r = agent_cli(
        "provision",
        "--device-id",
        "d3",
        "--profile",
        "rpi4-4gb",
        "--root",
        str(keys_dir / "root.json"),
        "--train-data",
        str(tmp_path / "missing"),
        data_dir=tmp_path / "bad",
        check=False,
    )
    assert r.returncode != 0 and "missing" in r.stderr
    assert not (tmp_path / "bad" / "config.json").exists()


def agent(tmp_path, **cfg) -> tuple[AgentPaths, AgentConfig]:
    paths = AgentPaths(tmp_path / "agent")
    paths.ensure_dirs()
    config = AgentConfig(device_id="d1", profile="rpi4-4gb", **cfg)
    config.save(paths)
    return paths, config


CHAT = [
    {"role": "system", "content": "You are a secret system prompt."},
    {"role": "user", "content": "Turn on the porch light."},
    {"role": "assistant", "content": "The porch light is on."},
    {"role": "user", "content": "And the garden one, please."},
]


def test_only_user_messages_are_kept_up_to_the_cap_and_wipe_erases_them(tmp_path) -> None:
    paths, config = agent(tmp_path, learn_from_use=True, learn_max_bytes=120)
    rec = learn.recorder(paths, config)
    assert rec(CHAT) == 2
    kept = [json.loads(x)["text"] for x in device.learned_path(paths).read_text().splitlines()]
    assert kept == ["Turn on the porch light.", "And the garden one, please."]
    assert rec([{"role": "user", "content": "x" * 200}]) == 0  # over the cap: not kept
    assert rec([{"role": "user", "content": "Dim it."}]) == 1
    assert device.learned_path(paths).stat().st_size <= 120
    assert device.learned_path(paths).stat().st_mode & 0o077 == 0

    st = json.loads(agent_cli("learn", "status", "--data-dir", str(paths.root), "--format", "json").stdout)
    assert st["messages"] == 3 and st["enabled"] is True
    out = agent_cli("learn", "wipe", "--data-dir", str(paths.root)).stdout
    assert "wiped" in out and not device.learned_path(paths).exists()


def test_learning_from_use_is_off_by_default(tmp_path) -> None:
    paths, config = agent(tmp_path)
    assert learn.recorder(paths, config)(CHAT) == 0
    assert not device.learned_path(paths).exists()


def test_local_data_reads_the_train_dir_and_kept_messages_and_splits_by_content(tmp_path, text_dir) -> None:
    paths, config = agent(tmp_path, train_data=str(text_dir), learn_from_use=True)
    learn.recorder(paths, config)(CHAT)
    data = device.local_data(paths, config)
    docs = sorted(data.train + data.heldout)
    assert "Turn on the porch light." in docs and "The fan spins slowly." in docs
    assert not any("secret system prompt" in d or "porch light is on" in d for d in docs)
    assert data.heldout and len(data.sha256) == 64
    assert "porch" not in repr(data)
    assert device.local_data(paths, config).sha256 == data.sha256


def test_no_data_oversized_data_and_learn_only_devices(tmp_path, text_dir) -> None:
    paths, config = agent(tmp_path)
    with pytest.raises(device.Decline) as e:
        device.local_data(paths, config)
    assert e.value.reason == "no-train-data"
    config.train_data, config.train_max_bytes = str(text_dir), 10
    with pytest.raises(device.Decline) as e:
        device.local_data(paths, config)
    assert e.value.reason == "no-train-data" and "over 10 bytes" in str(e.value)
    config.train_data, config.learn_from_use, config.train_max_bytes = None, True, 1 << 20
    learn.recorder(paths, config)(CHAT + [{"role": "user", "content": "Open the gate."}])
    assert len(device.local_data(paths, config).train) >= 1


def test_the_local_api_hands_chat_messages_to_the_hook(tmp_path) -> None:
    from fastapi.testclient import TestClient
    from test_agent_api import ScriptedRuntime

    from agent.api import AdminHooks, create_app
    from agent.config import Limits
    from agent.engine import Engine, ModelHandle

    paths, config = agent(tmp_path, learn_from_use=True)
    engine = Engine(queue_size=2, max_prompt_tokens=400)
    engine.start()
    try:
        engine.swap(ModelHandle(ScriptedRuntime(), "tiny", "1.0.0", "A", "fake"))
        app = create_app(
            engine=engine, token="t", limits=Limits(), hooks=AdminHooks(on_chat=learn.recorder(paths, config))
        )
        with TestClient(app, client=("127.0.0.1", 5555)) as client:
            r = client.post(
                "/v1/chat/completions", headers={"Authorization": "Bearer t"}, json={"messages": CHAT, "max_tokens": 2}
            )
            assert r.status_code == 200, r.text
            r = client.post(
                "/v1/completions",
                headers={"Authorization": "Bearer t"},
                json={"prompt": "raw completion text", "max_tokens": 2},
            )
            assert r.status_code == 200, r.text
    finally:
        engine.stop()
    kept = device.learned_path(paths).read_text()
    assert "porch light." in kept and "secret" not in kept and "raw completion" not in kept


def test_the_daemon_side_of_federated_imports_without_torch_or_flower() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['flwr'] = None\n"
        "import agent.federated.supervisor, agent.federated.learn, agent.federated.device, agent.daemon\n"
        "assert not [k for k, v in sys.modules.items() if v is not None and k.split('.')[0] in ('torch', 'flwr')]\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr

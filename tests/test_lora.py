"""LoRA on edgellm's LlamaLM, with the frozen base read back from a GGUF (what a device serves)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fixtures_gguf import MIXED_TEXT  # noqa: E402

from edgellm.errors import BuildError  # noqa: E402
from edgellm.pipeline import lora  # noqa: E402
from edgellm.pipeline.gguf_load import gguf_tokenizer, load_gguf_model  # noqa: E402
from edgellm.pipeline.model import load_model  # noqa: E402

IDS = torch.tensor([[0, 5, 17, 42, 99, 7, 300, 12, 64, 128, 3, 9]])

_COLORS = ["red", "green", "blue", "amber", "white"]
_PLACES = ["kitchen", "garage", "garden", "hall"]


def lamp_text(n: int, offset: int = 0) -> list[str]:
    """A regular text the base model has never seen (it was trained on robot/sensor sentences)."""
    return [
        f"The {_COLORS[(i + offset) % 5]} lamp in the {_PLACES[(i + offset) % 4]} blinks {(i + offset) % 3 + 1} times."
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def reference(hf_llama_dir):
    torch.set_num_threads(1)
    return load_model(hf_llama_dir).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(IDS)[0]


def test_f16_gguf_loads_to_logits_close_to_the_torch_model(reference, gguf_exports) -> None:
    model = load_gguf_model(gguf_exports["gguf-f16"])
    ref = logits(reference)
    diff = (logits(model) - ref).abs().max().item()
    assert diff < 0.02, diff  # measured 0.004 (max |logit| 11)
    assert (logits(model).argmax(-1) == ref.argmax(-1)).float().mean() == 1.0
    assert not any(p.requires_grad for p in model.parameters())


def test_q8_0_gguf_loads_to_logits_close_to_the_torch_model(reference, gguf_exports) -> None:
    model = load_gguf_model(gguf_exports["gguf-q8_0"])
    ref = logits(reference)
    diff = (logits(model) - ref).abs().max().item()
    assert diff < 0.5, diff  # measured 0.15
    assert (logits(model).argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_k_quant_gguf_loads_too(reference, gguf_exports) -> None:
    model = load_gguf_model(gguf_exports["gguf-q4_k_m"])
    ref = logits(reference)
    assert (logits(model) - ref).abs().max().item() < 4.0  # measured 1.6
    assert (logits(model).argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_f32_gguf_round_trips_exactly_including_the_rope_row_order(reference, gguf_exports) -> None:
    model = load_gguf_model(gguf_exports["gguf-f32"])
    assert torch.allclose(logits(model), logits(reference), atol=1e-4)


def test_tokenizer_rebuilt_from_the_gguf_vocab_matches_tokenizer_json(hf_llama_dir, gguf_exports) -> None:
    from edgellm.pipeline.tokenizer import load_tokenizer

    ours, theirs = gguf_tokenizer(gguf_exports["gguf-q8_0"]), load_tokenizer(hf_llama_dir)
    text = MIXED_TEXT + " The robot reports the battery. <|user|>"
    assert ours.encode(text, add_special_tokens=False).ids == theirs.encode(text, add_special_tokens=False).ids


def test_adapters_with_b_zero_leave_logits_unchanged(gguf_exports) -> None:
    model = load_gguf_model(gguf_exports["gguf-f16"])
    before = logits(model)
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0))
    assert torch.equal(logits(model), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_merge_equals_the_unmerged_adapted_forward(gguf_exports) -> None:
    model = load_gguf_model(gguf_exports["gguf-q8_0"])
    base = logits(model)
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0))
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in lora.lora_state(model).items()}
    lora.load_lora_state(model, state)
    adapted = logits(model)
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapters do something
    lora.merge_lora(model)
    assert not any(isinstance(m, lora.LoraLinear) for m in model.modules())
    assert torch.allclose(logits(model), adapted, atol=1e-4)


def test_expected_shapes_match_lora_state_and_initial_state(gguf_exports) -> None:
    model = load_gguf_model(gguf_exports["gguf-f16"])
    cfg = lora.LoraConfig(rank=4, alpha=8.0)
    lora.apply_lora(model, cfg)
    shapes = lora.expected_shapes(model.config, cfg)
    assert {k: tuple(v.shape) for k, v in lora.lora_state(model).items()} == shapes
    assert "layers.0.self_attn.q_proj.lora_A" in shapes and "layers.1.mlp.down_proj.lora_B" in shapes
    assert len(shapes) == 2 * 7 * model.config.num_hidden_layers
    init = lora.initial_lora_state(model.config, cfg, seed=3)
    assert {k: tuple(v.shape) for k, v in init.items()} == shapes
    assert all(not v.any() for k, v in init.items() if k.endswith("lora_B"))
    assert torch.equal(
        init["layers.0.self_attn.q_proj.lora_A"],
        lora.initial_lora_state(model.config, cfg, seed=3)["layers.0.self_attn.q_proj.lora_A"],
    )


def test_load_lora_state_refuses_wrong_keys_shapes_and_non_finite_values(gguf_exports) -> None:
    model = load_gguf_model(gguf_exports["gguf-f16"])
    lora.apply_lora(model, lora.LoraConfig(rank=2, alpha=4.0))
    good = lora.lora_state(model)
    key = "layers.0.self_attn.q_proj.lora_A"
    for bad in (
        {k: v for k, v in good.items() if k != key},
        {**good, key: torch.zeros(3, good[key].shape[1])},
        {**good, "layers.9.mlp.up_proj.lora_A": torch.zeros(2, 2)},
        {**good, key: torch.full(good[key].shape, float("nan"))},
    ):
        with pytest.raises(BuildError):
            lora.load_lora_state(model, bad)
    assert torch.equal(lora.lora_state(model)[key], good[key])


def test_invalid_lora_config_is_refused() -> None:
    for kw in ({"rank": 0}, {"alpha": float("inf")}, {"targets": ("embed_tokens",)}):
        with pytest.raises(BuildError):
            lora.LoraConfig(**kw)


def test_training_a_few_steps_lowers_heldout_loss_on_a_regular_text(gguf_exports) -> None:
    model = load_gguf_model(gguf_exports["gguf-q8_0"])
    tok = gguf_tokenizer(gguf_exports["gguf-q8_0"])
    train, heldout = lamp_text(120), lamp_text(20, offset=7)
    cfg = lora.LoraConfig(rank=4, alpha=8.0)
    lora.apply_lora(model, cfg)
    before = lora.heldout_loss(model, tok, heldout, seq_len=64)
    base_weight = model.model.layers[0].self_attn.q_proj.base.weight.clone()
    stats = lora.train_lora(model, tok, train, cfg, steps=30, lr=3e-3, heldout=heldout, seq_len=64, seed=0)
    after = lora.heldout_loss(model, tok, heldout, seq_len=64)
    assert after < before - 0.3, (before, after)
    assert stats["val_loss"] == pytest.approx(after, rel=1e-5)
    assert stats["trainable_params"] == sum(v.numel() for v in lora.lora_state(model).values())
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base.weight, base_weight)  # base stays frozen


def test_a_merged_gguf_model_saves_as_a_model_dir_that_exports_back(gguf_exports, tmp_path) -> None:
    """The server's merge path: GGUF base + adapters -> model dir -> GGUF, same model and tokenizer."""
    from edgellm.pipeline.export.gguf import export_gguf
    from edgellm.pipeline.gguf_load import _field, _reader, write_gguf_tokenizer
    from edgellm.pipeline.model import save_model_dir

    src = gguf_exports["gguf-f16"]
    model = load_gguf_model(src)
    lora.apply_lora(model, lora.LoraConfig(rank=2, alpha=4.0))
    gen = torch.Generator().manual_seed(2)
    lora.load_lora_state(
        model, {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in lora.lora_state(model).items()}
    )
    lora.merge_lora(model)
    merged = logits(model)
    out = save_model_dir(model, tmp_path / "merged")
    write_gguf_tokenizer(src, out)
    export_gguf(out, tmp_path / "merged.gguf", "gguf-f32")

    again = load_gguf_model(tmp_path / "merged.gguf")
    assert torch.allclose(logits(again), merged, atol=1e-4)
    a, b = _reader(src), _reader(tmp_path / "merged.gguf")
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
        "tokenizer.ggml.add_bos_token",
    ):
        assert _field(a, key) == _field(b, key), key

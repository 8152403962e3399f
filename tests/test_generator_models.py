"""The SiT-gs flow transformer against the released code's fixtures, the released key layout, and its invariants."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from generator.config import GeneratorConfig, ModelConfig, load_generator_config
from generator.models import LayoutModel, TextureModel, build_model
from generator.official import (convert_released_state_dict, from_released_layout, load_released_generator,
                                released_config, to_released_layout)
from generator.samplers import Guidance, GuidedVelocity

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(official_dir):
    model = load_released_generator(official_dir / "tiny_sit.safetensors", load_generator_config("sit_tiny").model)
    return model, load_file(str(official_dir / "tiny_sit_io.safetensors"))


def test_tiny_config_matches_fixture_config(official_dir):
    released = json.loads((official_dir / "tiny_sit.json").read_text())["config"]
    ours = load_generator_config("sit_tiny").model
    assert released["input_size"] == [ours.num_tokens, 1] and released["patch_size"] == 1
    assert (released["in_channels"], released["hidden_size"], released["depth"], released["num_heads"],
            released["mlp_ratio"], released["class_dropout_prob"], released["num_classes"],
            released["learn_sigma"], released["cond_channels"]) == (
        ours.in_channels, ours.hidden_size, ours.depth, ours.num_heads, ours.mlp_ratio,
        ours.class_dropout_prob, ours.num_classes, ours.learn_sigma, ours.layout_channels)


def test_plain_forward_reproduces_released(tiny):
    model, io = tiny
    with torch.no_grad():
        out = model(from_released_layout(io["x"]), io["t"], io["y"].long(), io["cond"])
    assert (to_released_layout(out) - io["out"]).abs().max() < TOL


def test_guided_call_reproduces_released(tiny):
    """The release batches [cond; uncond] rows and returns the guided velocity for both halves; we evaluate
    the conditional rows only and add the unconditional ones only inside the interval."""
    model, io = tiny
    half = io["cfg_x"].shape[0] // 2
    assert torch.equal(io["cfg_x"][:half], io["cfg_x"][half:])
    x, labels, layout = from_released_layout(io["cfg_x"])[:half], io["cfg_y"][:half].long(), io["cfg_cond"][:half]
    velocity = GuidedVelocity(model, labels, layout, Guidance(1.5, 0.2, 1.0))
    with torch.no_grad():
        guided = to_released_layout(velocity(x, float(io["cfg_t"][0])))
        assert velocity.rows == 2 * half
        low = to_released_layout(velocity(x, float(io["cfg_low_t"][0])))
        assert velocity.rows == 3 * half and velocity.calls == 2
        null_rows = model(from_released_layout(io["cfg_x"])[half:], io["cfg_low_t"][half:],
                          io["cfg_y"][half:].long(), io["cfg_cond"][half:])
    assert (guided - io["cfg_out"][:half]).abs().max() < TOL
    assert (guided - io["cfg_out"][half:]).abs().max() < TOL
    assert (low - io["cfg_low_out"][:half]).abs().max() < TOL
    assert (to_released_layout(null_rows) - io["cfg_low_out"][half:]).abs().max() < TOL


def _released_xl_keys(official_dir):
    shapes = {}
    for line in (official_dir / "keys_sit_xl_gs.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            shapes[key] = tuple(json.loads(shape.replace("(", "[").replace(")", "]").replace(",]", "]")))
    return shapes


def test_released_xl_key_layout(official_dir):
    shapes = _released_xl_keys(official_dir)
    header = (official_dir / "keys_sit_xl_gs.txt").read_text().splitlines()[0]
    assert len(shapes) == 296 and f"{sum(torch.Size(s).numel() for s in shapes.values())} numbers" in header
    state = {"ema_model." + k: torch.empty(s, device="meta") for k, s in shapes.items()}
    state["model.ignored_training_copy"] = torch.empty(1, device="meta")
    config = released_config()
    converted = convert_released_state_dict(state, config)
    with torch.device("meta"):
        model = build_model(config)
    assert isinstance(model, TextureModel)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == sum(
        torch.Size(s).numel() for k, s in shapes.items() if k != "pos_embed")
    assert load_generator_config("sit_xl").model == config


def test_strict_loading_names_the_problem(official_dir):
    config = load_generator_config("sit_tiny").model
    state = load_file(str(official_dir / "tiny_sit.safetensors"))
    broken = {k: v for k, v in state.items() if k != "blocks.1.attn.qkv.bias"}
    with pytest.raises(ValueError, match="blocks.1.attn.qkv.bias"):
        convert_released_state_dict(broken, config)
    with pytest.raises(ValueError, match="y_embedder.embedding_table.weight"):
        convert_released_state_dict(state, ModelConfig(**{**config.__dict__, "num_classes": 11}))


def test_bad_inputs_raise_clear_errors(tiny):
    model, io = tiny
    x, t, y, cond = from_released_layout(io["x"]), io["t"], io["y"].long(), io["cond"]
    cases = [
        ((x, t, torch.tensor([0, 1, 2, 11]), cond), "labels outside"),
        ((x, t, torch.tensor([0, 1, 2, -1]), cond), "labels outside"),
        ((x, t, io["y"], cond), "integer"),
        ((x.clone().fill_(float("nan")), t, y, cond), "NaN"),
        ((x, t, y, cond.clone().fill_(float("inf"))), "NaN/inf in layout"),
        ((x[..., :12], t, y, cond), r"\(B, N, 13\)"),
        ((x, t[:3], y, cond), "t must be"),
        ((x, t, y, None), "layout .* is required"),
        ((x, t, y, cond[:, :8]), "layout must be"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model(*args)


def test_fresh_model_predicts_zero_and_layout_model_rules():
    config = ModelConfig.sized("S", depth=2, num_tokens=8, in_channels=5, num_classes=4, layout_channels=None,
                               pos_embed=True, qk_norm=True)
    model = build_model(config)
    assert isinstance(model, LayoutModel)
    x = torch.randn(3, 8, 5)
    out = model(x, 0.3, torch.tensor([0, 1, 4]))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # adaLN-Zero: zero output at init
    with pytest.raises(ValueError, match="no layout condition"):
        model(x, 0.3, torch.tensor([0, 1, 4]), torch.zeros(3, 8, 5))
    with pytest.raises(ValueError, match="positional embedding holds 8"):
        model(torch.randn(3, 9, 5), 0.3, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="LayoutModel takes no layout"):
        LayoutModel(ModelConfig.sized("S", depth=1))
    with pytest.raises(ValueError, match="TextureModel needs"):
        TextureModel(config)


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def test_checkpointed_blocks_give_the_same_gradients(tiny):
    """engine.activation_checkpointing recomputes each block in the backward: same gradients, bit for bit."""
    model, io = tiny
    x, t, y, cond = from_released_layout(io["x"]), io["t"], io["y"].long(), io["cond"]

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(x, t, y, cond).square().mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return grads

    plain = gradients()
    model.checkpoint_blocks = True
    try:
        recomputed = gradients()
    finally:
        model.checkpoint_blocks = False
    assert plain and plain.keys() == recomputed.keys()
    assert all(torch.equal(plain[name], recomputed[name]) for name in plain)


def test_texture_model_is_permutation_equivariant(tiny):
    """Without a positional embedding, tokens are a set: permuting tokens and layout permutes the output."""
    model, io = tiny
    x, t, y, cond = from_released_layout(io["x"]), io["t"], io["y"].long(), io["cond"]
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(x, t, y, cond)
        permuted = model(x[:, perm], t, y, cond[:, perm])
    assert (permuted - out[:, perm]).abs().max() < 1e-5


def test_qk_norm_label_dropout_and_fused_attention(monkeypatch):
    config = ModelConfig(num_tokens=6, in_channels=7, hidden_size=32, depth=3, num_heads=4, num_classes=5,
                         class_dropout_prob=0.5, layout_channels=5, qk_norm=True)
    model = _randomised(build_model(config))
    assert all(block.attn.q_norm.weight.shape == (8,) for block in model.blocks)
    x, layout, y = torch.randn(4, 6, 7), torch.randn(4, 6, 5), torch.tensor([0, 1, 2, 3])
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        dropped = model(x, 0.5, y, layout, force_drop=torch.tensor([True, False, True, False]))
        reference = model(x, 0.5, torch.tensor([5, 1, 5, 3]), layout)
    assert len(calls) == 2 * config.depth
    assert torch.equal(dropped, reference)
    model.train()
    torch.manual_seed(0)
    labels = torch.zeros(4000, dtype=torch.long)
    dropped_share = (model.y_embedder.drop(labels) == 5).float().mean().item()
    assert abs(dropped_share - 0.5) < 0.04


def test_config_yaml_roundtrip_and_strictness(tmp_path):
    config = load_generator_config("sit_layout_s")
    path = tmp_path / "c.yaml"
    config.to_yaml(path)
    assert GeneratorConfig.from_yaml(path) == config
    with pytest.raises(ValueError, match="unknown key.*hidden"):
        GeneratorConfig.from_dict({"model": {"hidden": 3}})
    with pytest.raises(ValueError, match="model.depth: expected int"):
        GeneratorConfig.from_dict({"model": {"depth": "12"}})
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(hidden_size=100, num_heads=16)
    with pytest.raises(ValueError, match="method must be"):
        GeneratorConfig.from_dict({"sampler": {"method": "dopri5"}})
    sizes = {n: load_generator_config(f"sit_{n}").model for n in ("s", "b", "l", "xl")}
    assert {n: (c.depth, c.hidden_size, c.num_heads) for n, c in sizes.items()} == {
        "s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
    with torch.device("meta"):
        layout_model = build_model(config.model)
    assert 32e6 < sum(p.numel() for p in layout_model.parameters()) < 34e6  # "about 33 M" (SPEC.md 7)

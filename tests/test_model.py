"""GPSToken model behaviour: configs, input errors, any token count, per-tile norm, tiles and merging, gradients."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from tokenizer import GPSToken, GPSTokenConfig, config_from_released, load_config
from tokenizer.model import TileGroupNorm, refine_geometry, repeat_pixels
from tokenizer.tiles import join_tiles, merge_tile_tokens, split_tiles


@pytest.fixture(scope="module")
def tiny(official_dir) -> GPSToken:
    """The fixture's tiny config (64 px tiles, 16x16 render, C = 8) with seeded random weights."""
    released = json.loads((official_dir / "tiny_gpstoken.json").read_text())
    torch.manual_seed(0)
    model = GPSToken(config_from_released(released["gpsconfig"], released["decoderconfig"], name="tiny"))
    with torch.no_grad():                       # a non-zero geometry head, so refinement actually moves tokens
        model.encoder.geometry_head.weight.normal_(0, 0.02)
    return model.eval()


def grid_layout(rows: int, cols: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial geometry and boxes of a regular rows x cols grid of regions over a tile (partition formulas)."""
    edges_y, edges_x = torch.linspace(-1, 1, rows + 1), torch.linspace(-1, 1, cols + 1)
    y0, y1 = edges_y[:-1, None].expand(rows, cols), edges_y[1:, None].expand(rows, cols)
    x0, x1 = edges_x[None, :-1].expand(rows, cols), edges_x[None, 1:].expand(rows, cols)
    boxes = torch.stack([x0, y0, x1, y1], -1).reshape(-1, 4)
    geometry = torch.stack([(x1 - x0) / 3, (y1 - y0) / 3, torch.zeros_like(x0), (x0 + x1) / 2, (y0 + y1) / 2],
                           -1).reshape(-1, 5)
    return geometry.expand(batch, -1, -1).clone(), boxes.expand(batch, -1, -1).clone()


def random_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- configs ------------------------------------------------------------------------------------------------------


def test_config_yaml_round_trip(tmp_path):
    config = load_config("gpstoken_l256")
    config.to_yaml(tmp_path / "copy.yaml")
    assert GPSTokenConfig.from_yaml(tmp_path / "copy.yaml") == config


@pytest.mark.parametrize("text, message", [
    ("num_tokens: 64\ntexure_channels: 8\n", r"unknown key\(s\) \['texure_channels'\]"),
    ("encoder:\n  widht: 64\n", r"config\.encoder|unknown key\(s\) \['widht'\]"),
    ("num_tokens: many\n", r"\.num_tokens: expected int, got 'many'"),
    ("decoder:\n  channel_mult: 4\n", r"\.decoder\.channel_mult: expected a list"),
    ("encoder:\n  width: 100\n  heads: 8\n", "not divisible by encoder.heads"),
])
def test_config_errors_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        GPSTokenConfig.from_yaml(path)


def test_from_config_name_builds_the_released_architecture():
    with torch.device("meta"):
        model = GPSToken.from_config_name("gpstoken_m128")
    assert model.config == load_config("gpstoken_m128")
    assert len(model.encoder.blocks) == 30 and model.encoder.texture_head.out_features == 16


# -- input errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("column, value, message", [
    (7, float("nan"), "NaN or inf"),
    (3, float("inf"), "NaN or inf"),
    (0, 0.0, "sigma must be > 0"),
    (1, -0.1, "sigma must be > 0"),
    (2, 1.0, r"\|rho\| < 1"),
    (2, -1.5, r"\|rho\| < 1"),
])
def test_decode_rejects_invalid_tokens(tiny, column, value, message):
    geometry, _ = grid_layout(4, 4, batch=2)
    tokens = torch.cat([geometry, torch.randn(2, 16, 8)], -1)
    tokens[1, 5, column] = value
    with pytest.raises(ValueError, match=message + r".*batch 1, token 5"):
        tiny.decode(tokens)


def test_decode_rejects_wrong_shapes_and_tile_counts(tiny):
    geometry, _ = grid_layout(4, 4)
    with pytest.raises(ValueError, match=r"\(B, N, 13\).*got \(1, 16, 9\)"):
        tiny.decode(torch.cat([geometry, torch.randn(1, 16, 4)], -1))
    with pytest.raises(ValueError, match="tiles_per_side must be a positive int"):
        tiny.decode(torch.cat([geometry, torch.randn(1, 16, 8)], -1), tiles_per_side=0)


def test_encode_rejects_mismatched_inputs(tiny):
    geometry, boxes = grid_layout(4, 4)
    images = random_images(1, 64)
    with pytest.raises(ValueError, match=r"boxes must be \(B, N, 4\)"):
        tiny.encode(images, geometry, boxes[:, :8])
    with pytest.raises(ValueError, match=r"images must be float \(B, 3, H, W\)"):
        tiny.encode(images[:, :1], geometry, boxes)
    outside = geometry.clone()
    outside[0, 2, 3] = 1.0                           # mu on the border: its logit is infinite
    with pytest.raises(ValueError, match=r"mu must lie strictly inside.*token 2"):
        tiny.encode(images, outside, boxes)


# -- behaviour ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", [(4, 4), (8, 16), (16, 32)])   # 16, 128 and 512 tokens per tile
def test_any_token_count_runs_through_encode_and_decode(tiny, rows, cols):
    geometry, boxes = grid_layout(rows, cols, batch=2)
    with torch.no_grad():
        tokens = tiny.encode(random_images(2, 64), geometry, boxes)
        recon = tiny.decode(tokens)
    assert tokens.shape == (2, rows * cols, 13) and recon.shape == (2, 3, 64, 64)
    assert torch.isfinite(recon).all()
    assert (tokens[..., :2] > 0).all() and (tokens[..., 2:5].abs() < 1).all()


def test_encoder_is_token_permutation_equivariant(tiny):
    """No positional encoding: permuting the tokens permutes the output tokens (the decoder then ignores order)."""
    geometry, boxes = grid_layout(4, 8)
    images = random_images(1, 64, seed=3)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = tiny.encode(images, geometry, boxes)
        permuted = tiny.encode(images, geometry[:, order], boxes[:, order])
        assert torch.allclose(permuted, tokens[:, order], atol=1e-5)
        assert torch.allclose(tiny.decode(permuted), tiny.decode(tokens), atol=1e-4)


def test_zero_geometry_update_returns_the_initial_geometry():
    geometry, _ = grid_layout(8, 8)
    refined = refine_geometry(geometry, torch.zeros_like(geometry))
    assert torch.allclose(refined, geometry, atol=1e-6)
    moved = refine_geometry(geometry, torch.full_like(geometry, 0.5))
    assert (moved[..., :2] > geometry[..., :2]).all() and (moved[..., :2] < 1).all()


def test_pooled_rois_equal_each_block_pooling_the_projected_samples(tiny):
    """The released order, roi_pool_k(roi_proj(samples)) per block, in float64: values and gradients."""
    encoder = copy.deepcopy(tiny.encoder).double()
    with torch.no_grad():
        for block in encoder.blocks:
            block.roi_pool.weight.normal_()
            block.roi_pool.bias.normal_()
        encoder.roi_proj.bias.normal_()
    samples = torch.randn(6, encoder.roi_proj.in_channels, encoder.roi_size ** 2, dtype=torch.float64)
    projected = encoder.roi_proj(samples.unflatten(2, (encoder.roi_size,) * 2)).flatten(2)
    released = torch.stack([block.roi_pool(projected)[..., 0] for block in encoder.blocks])
    pooled = encoder.pooled_rois(samples)
    torch.testing.assert_close(pooled, released, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(pooled)
    parameters = [encoder.roi_proj.weight, encoder.roi_proj.bias,
                  *(p for block in encoder.blocks for p in block.roi_pool.parameters())]
    for ours, theirs in zip(torch.autograd.grad((pooled * weights).sum(), parameters),
                            torch.autograd.grad((released * weights).sum(), parameters)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_repeat_pixels_is_nearest_upsampling_in_the_same_layout(memory_format):
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    ours, theirs = repeat_pixels(x), F.interpolate(x, scale_factor=2.0, mode="nearest")
    assert torch.equal(ours, theirs) and ours.is_contiguous(memory_format=memory_format)
    weights = torch.randn_like(theirs)
    torch.testing.assert_close(torch.autograd.grad((ours * weights).sum(), x)[0],
                               torch.autograd.grad((theirs * weights).sum(), x)[0], rtol=1e-14, atol=1e-14)


def released_tile_norm(norm: TileGroupNorm, x: torch.Tensor) -> torch.Tensor:
    """The released single-tile formula, restated: statistics as a 1x1 map, upsampled bicubically."""
    batch, channels, height, width = x.shape
    grouped = x.reshape(batch, 32, channels // 32, height, width)
    std, mean = torch.std_mean(grouped, dim=(2, 3, 4), keepdim=True, unbiased=False)
    mean = F.interpolate(mean.reshape(batch, 32, 1, 1), size=(height, width), mode="bicubic")
    std = F.interpolate(std.reshape(batch, 32, 1, 1), size=(height, width), mode="bicubic")
    normed = (grouped - mean[:, :, None]) / (std[:, :, None] + 1e-6)
    return normed.reshape(batch, channels, height, width) * norm.weight[:, None, None] + norm.bias[:, None, None]


def test_single_tile_norm_equals_released_formula_without_upsampling(monkeypatch):
    norm = TileGroupNorm(64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 64, 16, 16) * 3 + 1
    expected = released_tile_norm(norm, x)
    calls = []
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(k) or pytest.fail("upsampled at np = 1"))
    x.requires_grad_(True)
    out = norm(x)
    out.square().sum().backward()
    assert not calls
    assert torch.allclose(out, expected, atol=1e-5)
    # (z - mean) / (std + eps), not GroupNorm's sqrt(var + eps): visible on a near-constant group
    flat = torch.zeros(1, 32, 2, 2)
    flat[0, :, 0, 0] = 1e-5
    plain = F.group_norm(flat, 32, eps=1e-6)
    assert not torch.allclose(TileGroupNorm(32)(flat), plain, atol=1e-2)


def test_training_path_never_upsamples_statistics(tiny, monkeypatch):
    geometry, boxes = grid_layout(4, 4, batch=2)
    images = random_images(2, 64)
    original = F.interpolate

    def only_nearest(*args, **kwargs):
        assert kwargs.get("mode") == "nearest", f"unexpected {kwargs.get('mode')} interpolation at np = 1"
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "interpolate", only_nearest)
    tiny.train()
    try:
        recon, tokens = tiny(images, geometry, boxes)
        (recon.square().mean() + tokens.square().mean()).backward()
    finally:
        tiny.eval()
        tiny.zero_grad(set_to_none=True)


def test_every_trainable_parameter_gets_a_gradient(tiny):
    """No unused trainable parameters, so DDP needs no find_unused_parameters; the released but unused
    stem time-embedding projections are frozen."""
    geometry, boxes = grid_layout(4, 4, batch=2)
    recon, tokens = tiny(random_images(2, 64), geometry, boxes)
    (recon.square().mean() + tokens.square().mean()).backward()
    frozen = {name for name, p in tiny.named_parameters() if not p.requires_grad}
    assert frozen == {f"encoder.stem.block{i}.temb_proj.{w}" for i in (1, 2) for w in ("weight", "bias")}
    missing = [name for name, p in tiny.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    tiny.zero_grad(set_to_none=True)


def _decoder_gradients(model: GPSToken, rendered: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.decoder(rendered, 2).square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.decoder.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def test_checkpointed_decoder_levels_give_the_same_gradients(tiny):
    """engine.activation_checkpointing recomputes the decoder's levels in the backward: same outputs and
    gradients (bit for bit on the CPU), and nothing changes without autograd."""
    rendered = torch.randn(2, tiny.config.texture_channels, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = _decoder_gradients(tiny, rendered)
    tiny.decoder.checkpoint_levels = True
    try:
        recomputed = _decoder_gradients(tiny, rendered)
        with torch.no_grad():
            no_grad_out = tiny.decoder(rendered, 2)
    finally:
        tiny.decoder.checkpoint_levels = False
    assert plain.keys() == recomputed.keys()
    assert all(torch.equal(plain[name], recomputed[name]) for name in plain)
    with torch.no_grad():
        assert torch.equal(no_grad_out, tiny.decoder(rendered, 2))


def test_split_join_and_merge_per_image():
    images = random_images(3, 64, seed=5)
    tiles = split_tiles(images, 2)
    assert tiles.shape == (12, 3, 32, 32)
    assert torch.equal(tiles[5], images[1, :, :32, 32:])                  # image 1, tile (row 0, column 1)
    assert torch.equal(join_tiles(tiles, 2), images)
    tokens = torch.rand(12, 7, 13) * 1.8 - 0.9
    merged = merge_tile_tokens(tokens, 2)
    assert merged.shape == (3, 28, 13)
    for image in range(3):                                                  # every image merged on its own
        assert torch.equal(merged[image], merge_tile_tokens(tokens[4 * image:4 * image + 4], 2)[0])
    tile = 4 * 1 + 2                                                        # image 1, tile (row 1, column 0)
    local, whole = tokens[tile], merged[1, 2 * 7:3 * 7]
    assert torch.allclose(whole[:, :2], local[:, :2] / 2)
    assert torch.equal(whole[:, 2], local[:, 2]) and torch.equal(whole[:, 5:], local[:, 5:])
    assert torch.allclose(whole[:, 3], (local[:, 3] + 1) / 2 - 1)          # left half
    assert torch.allclose(whole[:, 4], (local[:, 4] + 1) / 2)              # bottom half
    with pytest.raises(ValueError, match="cannot be cut into 3x3"):
        split_tiles(images, 3)


def test_high_resolution_decode_uses_per_tile_statistics(tiny):
    """Decoding 2x2 merged tiles differs from decoding the same tokens as one tile (statistics per tile)."""
    geometry, boxes = grid_layout(4, 4, batch=4)
    with torch.no_grad():
        tile_tokens = tiny.encode(random_images(4, 64, seed=7), geometry, boxes)
        merged = merge_tile_tokens(tile_tokens, 2)
        high = tiny.decode(merged, tiles_per_side=2)
        assert high.shape == (1, 3, 128, 128) and torch.isfinite(high).all()
        two_images = tiny.decode(torch.cat([merged, merged.flip(1)]), tiles_per_side=2)
    assert torch.allclose(two_images[0], high[0], atol=1e-4)                # batch of images, one at a time
    assert torch.allclose(two_images[1], high[0], atol=1e-4)                # token order does not matter


def test_tokenize_and_reconstruct(tiny):
    pytest.importorskip("tokenizer.partition")
    model = GPSToken(dataclasses.replace(tiny.config, partition_min_size=4)).eval()
    model.load_state_dict(tiny.state_dict())
    rng = torch.Generator().manual_seed(11)
    images = torch.randint(0, 256, (2, 128, 128, 3), generator=rng, dtype=torch.uint8)
    result = model.tokenize(images, num_tokens=32)
    assert result.tokens.shape == (2, 4 * 32, 13) and result.tiles_per_side == 2
    assert result.tile_tokens.shape == (8, 32, 13) and result.boxes.shape == (8, 32, 4)
    recon = model.reconstruct(images, num_tokens=32)
    assert recon.shape == (2, 3, 128, 128) and torch.isfinite(recon).all()
    with pytest.raises(ValueError, match="uint8 RGB"):
        model.tokenize(images.float())
    with pytest.raises(ValueError, match="multiple of the tile size 64"):
        model.tokenize(images[:, :96, :96])


@pytest.mark.slow
def test_forward_compiles(tiny):
    geometry, boxes = grid_layout(4, 4, batch=2)
    images = random_images(2, 64)
    compiled = torch.compile(tiny)
    with torch.no_grad():
        recon, tokens = compiled(images, geometry, boxes)
        expected, _ = tiny(images, geometry, boxes)
    assert torch.allclose(recon, expected, atol=1e-4)

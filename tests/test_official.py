"""The released checkpoints: key lists and shapes of S64/M128/L256, the tiny released-code fixture, loader rules."""
from __future__ import annotations

import ast
import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenizer import CheckpointMismatchError, GPSToken, config_from_released, load_config, load_released
from tokenizer.official import match_state_dict, native_key, select_model_weights
from tokenizer.tiles import merge_tile_tokens, split_tiles

# Encoder outputs and pure data movement match to float32 rounding. The decoded images come out of a deep
# float32 decoder whose own rounding is ~1.5e-5 at this scale: the fixture itself differs by 1.5e-5 from a
# float64 evaluation of the same network. Mean errors are ~1e-6.
TOKEN_ATOL = 1e-5
IMAGE_ATOL = 3e-5
IMAGE_MEAN_ATOL = 3e-6


def released_key_list(official_dir, name: str) -> tuple[dict[str, tuple[int, ...]], int]:
    lines = (official_dir / f"keys_gpstoken_{name}.txt").read_text().splitlines()
    total = int(re.search(r"(\d+) numbers", lines[0]).group(1))
    shapes = {}
    for line in lines[1:]:
        key, shape = line.split("\t")
        shapes[key] = tuple(ast.literal_eval(shape))
    return shapes, total


class Payload:
    """An arbitrary Python object: a checkpoint holding one must not be unpickled."""


def meta_checkpoint(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def meta_model(config) -> GPSToken:
    with torch.device("meta"):
        return GPSToken(config)


@pytest.fixture(scope="module")
def tiny_config(official_dir):
    released = json.loads((official_dir / "tiny_gpstoken.json").read_text())
    return config_from_released(released["gpsconfig"], released["decoderconfig"], name="tiny")


@pytest.fixture(scope="module")
def tiny_model(official_dir, tiny_config):
    return load_released(official_dir / "tiny_gpstoken.safetensors", tiny_config)


@pytest.fixture(scope="module")
def tiny_io(official_dir):
    return load_file(str(official_dir / "tiny_gpstoken_io.safetensors"))


# -- released configs and key lists -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["s64", "m128", "l256"])
def test_released_config_builds_exactly_the_released_keys(official_dir, name):
    shapes, total = released_key_list(official_dir, name)
    config = load_config(f"gpstoken_{name}")
    model = meta_model(config)
    weights, sources = select_model_weights(meta_checkpoint(shapes))
    assert len(weights) == len(shapes)                      # every released key maps to a distinct name
    matched = match_state_dict(model, weights, sources)     # raises on any missing/unexpected/mismatched key
    model.load_state_dict(matched, assign=True)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        native_key(k): s for k, s in shapes.items()}
    assert model.num_parameters() == total                  # 128,663,478 (S64, M128) / 128,745,414 (L256)
    assert 128.6e6 < total < 128.8e6


def test_released_config_values():
    expected = {"s64": (64, 16), "m128": (128, 16), "l256": (256, 32)}
    for name, (num_tokens, texture) in expected.items():
        config = load_config(f"gpstoken_{name}")
        assert (config.num_tokens, config.texture_channels, config.token_dim) == (num_tokens, texture, 5 + texture)
        assert (config.render_size, config.tile_size, config.dmax) == (64, 256, 3.0)
        assert (config.partition_weight, config.partition_min_size) == (2.5, 8)
        assert (config.encoder.width, config.encoder.depth, config.encoder.heads, config.encoder.roi_size) == (
            512, 30, 8, 8)
        assert (config.decoder.channels, config.decoder.channel_mult, config.decoder.blocks_per_level) == (
            128, (1, 2, 4), 2)


def test_wrong_model_size_names_first_mismatched_key_and_both_shapes(official_dir):
    shapes, _ = released_key_list(official_dir, "l256")
    model = meta_model(load_config("gpstoken_m128"))
    with pytest.raises(CheckpointMismatchError, match=r"'to_gps\.1\.weight' \(model 'encoder\.texture_head\.weight'\) "
                                                      r"has shape \(32, 512\) but the model expects \(16, 512\)"):
        match_state_dict(model, *select_model_weights(meta_checkpoint(shapes)))


def test_wrong_model_size_from_file(official_dir, tiny_config):
    wrong = dataclasses.replace(tiny_config, texture_channels=16)
    with pytest.raises(CheckpointMismatchError, match=r"tiny_gpstoken\.safetensors.*'to_gps\.1\.weight' .*"
                                                      r"has shape \(8, 64\) but the model expects \(16, 64\)"):
        load_released(official_dir / "tiny_gpstoken.safetensors", wrong)


# -- the tiny released-code fixture -------------------------------------------------------------------------------


def assert_close(actual, expected, atol, mean_atol=None):
    assert actual.shape == expected.shape
    error = (actual - expected).abs()
    assert error.max().item() <= atol, f"max abs error {error.max().item():.3g} > {atol}"
    if mean_atol is not None:
        assert error.mean().item() <= mean_atol


def test_tiny_encode(tiny_model, tiny_io):
    with torch.no_grad():
        tokens = tiny_model.encode(tiny_io["image"], tiny_io["init_gpscodes"], tiny_io["regions"])
    assert_close(tokens, tiny_io["tokens"], TOKEN_ATOL)


def test_tiny_decode(tiny_model, tiny_io):
    with torch.no_grad():
        recon = tiny_model.decode(tiny_io["tokens"])
    assert_close(recon, tiny_io["recon"], IMAGE_ATOL, IMAGE_MEAN_ATOL)


def test_tiny_forward_matches_encode_then_decode(tiny_model, tiny_io):
    with torch.no_grad():
        recon, tokens = tiny_model(tiny_io["image"], tiny_io["init_gpscodes"], tiny_io["regions"])
    assert_close(tokens, tiny_io["tokens"], TOKEN_ATOL)
    assert_close(recon, tiny_io["recon"], IMAGE_ATOL, IMAGE_MEAN_ATOL)


def test_tiny_high_resolution(tiny_model, tiny_io):
    """2x2 tiles: split, encode per tile, merge into whole-image tokens, decode with per-tile statistics."""
    tiles = split_tiles(tiny_io["highres_image"], 2)
    assert torch.equal(tiles, tiny_io["highres_tile_images"])
    with torch.no_grad():
        tile_tokens = tiny_model.encode(tiles, tiny_io["highres_init_gpscodes"], tiny_io["highres_regions"])
        assert_close(tile_tokens, tiny_io["highres_tokens"], TOKEN_ATOL)
        merged = merge_tile_tokens(tiny_io["highres_tokens"], 2)
        assert_close(merged, tiny_io["highres_merged_tokens"], 1e-6)
        recon = tiny_model.decode(tiny_io["highres_merged_tokens"], tiles_per_side=2)
    assert_close(recon, tiny_io["highres_recon"], IMAGE_ATOL, IMAGE_MEAN_ATOL)


def test_tiny_tokenize_end_to_end(official_dir, tiny_model, tiny_io):
    """Whole uint8 image -> partition (min_size 4 as in the fixture) -> tiles -> merged tokens."""
    pytest.importorskip("tokenizer.partition")

    model = GPSToken(dataclasses.replace(tiny_model.config, partition_min_size=4))
    model.load_state_dict(tiny_model.state_dict())
    pixels = ((tiny_io["highres_image"][0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8)
    assert torch.allclose(pixels.float() / 127.5 - 1, tiny_io["highres_image"][0].permute(1, 2, 0), atol=1e-6)
    result = model.eval().tokenize(pixels.numpy())
    assert result.tiles_per_side == 2
    assert_close(result.init_geometry, tiny_io["highres_init_gpscodes"], 1e-6)
    assert_close(result.boxes, tiny_io["highres_regions"], 1e-6)
    assert_close(result.tokens, tiny_io["highres_merged_tokens"], TOKEN_ATOL)


# -- loader rules -------------------------------------------------------------------------------------------------


def test_prefixes_extras_and_ema_are_handled(tmp_path, official_dir, tiny_config, tiny_model, tiny_io):
    released = load_file(str(official_dir / "tiny_gpstoken.safetensors"))
    noisy = {f"module.{k}": v + 1.0 for k, v in released.items()}          # live weights, DDP-wrapped
    noisy.update({f"ema_model.{k}": v for k, v in released.items()})      # the EMA copy: the real weights
    noisy["discriminator.main.0.weight"] = torch.zeros(3)                  # not the model's: ignored
    noisy["lpips.net.lin0.weight"] = torch.zeros(2)
    path = tmp_path / "ckpt.safetensors"
    save_file(noisy, str(path))
    model = load_released(path, tiny_config)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    live = load_released(path, tiny_config, prefer_ema=False)
    assert torch.equal(live.decoder.conv_in.bias, tiny_model.decoder.conv_in.bias + 1.0)


def test_torch_file_without_pickles_and_native_names(tmp_path, official_dir, tiny_config, tiny_model, tiny_io):
    path = tmp_path / "native.pt"
    torch.save({"state_dict": tiny_model.state_dict(), "step": 7}, path)
    model = load_released(path, tiny_config)
    with torch.no_grad():
        tokens = model.encode(tiny_io["image"], tiny_io["init_gpscodes"], tiny_io["regions"])
    assert_close(tokens, tiny_io["tokens"], TOKEN_ATOL)

    evil = tmp_path / "evil.pt"
    torch.save({"decoder.conv_in.bias": Payload()}, evil)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported"):
        load_released(evil, tiny_config)


def test_missing_and_unexpected_keys(tmp_path, official_dir, tiny_config):
    released = load_file(str(official_dir / "tiny_gpstoken.safetensors"))
    missing = dict(released)
    del missing["attnblocks.1.ln2.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"lacks 'encoder\.blocks\.1\.norm2\.bias'"):
        load_released(tmp_path / "missing.safetensors", tiny_config)

    extra = dict(released)
    extra["attnblocks.7.ln1.weight"] = torch.ones(64)                   # a block the tiny model does not have
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"lacks.*'encoder\.blocks\.7\.norm1\.weight'"):
        load_released(tmp_path / "extra.safetensors", tiny_config)

    unknown = dict(released)
    unknown["decoder.mid.attn_2.q.weight"] = torch.ones(1)
    save_file(unknown, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"decoder\.mid\.attn_2\.q\.weight"):
        load_released(tmp_path / "unknown.safetensors", tiny_config)


def test_released_config_format_is_validated(official_dir):
    released = json.loads((official_dir / "tiny_gpstoken.json").read_text())
    bad = dict(released["decoderconfig"], z_channels=4, attn_resolutions=[16])
    with pytest.raises(ValueError, match="z_channels must equal gps_c.*attn_resolutions must be empty"):
        config_from_released(released["gpsconfig"], bad)


def test_loaded_model_is_frozen_where_released_is_unused(tiny_model):
    assert not tiny_model.encoder.stem.block1.temb_proj.weight.requires_grad
    assert not tiny_model.training

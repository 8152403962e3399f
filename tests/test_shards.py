"""Token shards: extraction with the tiny tokenizer, memory-mapped reading, statistics, resumption, bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from generator.extraction import ExtractionSettings, extract_tokens
from generator.shards import (ShardError, ShardPlan, TokenShardDataset, TokenShards, finalize_shards,
                              write_plan, write_shard)
from tiny_generation import NUM_CLASSES, ToyImages, cached_shards, make_shards, tiny_tokenizer
from tokenizer.partition import entropy_partition


COUNT = 20  # shards of 8, 8 and 4 images


@pytest.fixture(scope="module")
def shard_dir():
    return cached_shards(COUNT, shard_size=8)


def test_shards_hold_the_tokenizer_output_of_both_variants(shard_dir):
    shards = TokenShards(shard_dir)
    assert len(shards) == COUNT and shards.num_variants == 2 and shards.plan.num_shards == 3
    assert shards.labels.tolist() == [i % NUM_CLASSES for i in range(COUNT)]
    tokenizer, images = tiny_tokenizer(), ToyImages(COUNT)
    for index in (0, 10, COUNT - 1):  # first, middle and last (short) shard
        image, label = images[index]
        for variant, pixels in enumerate((image, np.ascontiguousarray(image[:, ::-1]))):
            part = entropy_partition(pixels, 16, tile_size=64)
            with torch.no_grad():
                expected = tokenizer.encode(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1,
                                            torch.from_numpy(part.geometry)[None], torch.from_numpy(part.boxes)[None])
            tokens, layout, stored_label = shards.sample(index, variant)
            assert stored_label == label
            np.testing.assert_array_equal(layout, part.geometry)
            np.testing.assert_allclose(tokens, expected[0].numpy(), atol=1e-4)  # batched vs single
    assert isinstance(shards._array(0, "tokens"), np.memmap)


def test_statistics_are_residual_channel_moments(shard_dir):
    shards = TokenShards(shard_dir)
    tokens = np.stack([shards.sample(i, v)[0] for i in range(COUNT) for v in range(2)]).astype(np.float64)
    layout = np.stack([shards.sample(i, v)[1] for i in range(COUNT) for v in range(2)]).astype(np.float64)
    residual = tokens.copy()
    residual[..., :5] -= layout
    stats = shards.stats()
    std = residual.reshape(-1, 13).std(0)
    np.testing.assert_allclose(stats.tokens.mean, residual.reshape(-1, 13).mean(0), atol=1e-6)
    np.testing.assert_allclose(stats.tokens.std, np.where(std > 1e-6, std, 1.0), rtol=1e-5)
    np.testing.assert_allclose(stats.layout_mean, layout.reshape(-1, 5).mean(0), atol=1e-6)
    assert stats.layout_std[2] == 1.0  # rho of the init geometry is constant 0
    assert stats.count == COUNT * 2 * 16


def test_dataset_draw_seed_picks_a_variant(shard_dir):
    dataset = TokenShardDataset(TokenShards(shard_dir))
    original = dataset[4]["tokens"]
    picked = {bool(torch.equal(dataset[(4, seed)]["tokens"], original)) for seed in range(20)}
    assert picked == {True, False}
    assert torch.equal(dataset[(4, 3)]["tokens"], dataset[(4, 3)]["tokens"])
    item = dataset[(4, 3)]
    assert item["tokens"].dtype == torch.float32 and item["label"].item() == 4 % NUM_CLASSES
    # survives pickling into DataLoader workers (memory maps are reopened there)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1)
    assert next(iter(loader))["tokens"].shape == (4, 16, 13)


def test_extraction_resumes_only_unfinished_shards(tmp_path, shard_dir):
    shutil.copytree(shard_dir, tmp_path / "s", dirs_exist_ok=True)
    directory = tmp_path / "s"
    for path in directory.glob("shard_00002.*"):
        path.unlink()
    index = json.loads((directory / "index.json").read_text())
    (directory / "index.json").write_text(json.dumps({**index, "complete": False}))
    with pytest.raises(ShardError, match="shard_00002.json"):
        TokenShards(directory)

    tokenizer = tiny_tokenizer()
    calls = []
    original_encode = tokenizer.encode
    tokenizer.encode = lambda *a: calls.append(a[0].shape[0]) or original_encode(*a)
    extract_tokens(tokenizer, ToyImages(COUNT), NUM_CLASSES,
                   ExtractionSettings(str(directory), shard_size=8, batch_size=8, num_workers=0, hflip=True,
                                      tokenizer_description="tiny random"))
    assert sum(calls) == 4 * 2  # the last shard: 4 images, two variants each
    reference, resumed = TokenShards(shard_dir), TokenShards(directory)
    for index in range(COUNT):
        np.testing.assert_array_equal(reference.sample(index, 1)[0], resumed.sample(index, 1)[0])
    assert reference.stats() == resumed.stats()


def test_a_different_plan_in_the_same_directory_is_refused(tmp_path, shard_dir):
    shutil.copytree(shard_dir, tmp_path / "s")
    with pytest.raises(ShardError, match="different extraction"):
        make_shards(tmp_path / "s", count=COUNT, shard_size=4)


def test_missing_and_truncated_shards_name_the_file(tmp_path, shard_dir):
    shutil.copytree(shard_dir, tmp_path / "missing")
    (tmp_path / "missing" / "shard_00002.layout.npy").unlink()
    with pytest.raises(ShardError, match=r"shard_00002\.layout\.npy: missing"):
        TokenShards(tmp_path / "missing")

    shutil.copytree(shard_dir, tmp_path / "truncated")
    path = tmp_path / "truncated" / "shard_00001.tokens.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ShardError, match=r"shard_00001\.tokens\.npy.*truncated"):
        TokenShards(tmp_path / "truncated")

    with pytest.raises(ShardError, match="no shard index"):
        TokenShards(tmp_path / "nowhere")


def test_labels_outside_the_classes_are_refused(tmp_path):
    plan = ShardPlan(num_samples=2, shard_size=2, num_tokens=4, token_dim=7, num_classes=3)
    write_plan(tmp_path, plan)
    tokens, layout = np.zeros((2, 1, 4, 7)), np.zeros((2, 1, 4, 5))
    with pytest.raises(ValueError, match=r"labels \[3\] outside \[0, 3\)"):
        write_shard(tmp_path, plan, 0, tokens, layout, np.array([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        write_shard(tmp_path, plan, 0, tokens[:1], layout, np.array([0, 1]))
    write_shard(tmp_path, plan, 0, tokens, layout, np.array([0, 2]))
    finalize_shards(tmp_path)
    np.save(tmp_path / "shard_00000.labels.npy", np.array([0, 7]))
    with pytest.raises(ShardError, match="labels outside"):
        TokenShards(tmp_path)


def test_extract_tokens_script_on_fashion_mnist(tmp_path):
    from safetensors.torch import save_file

    from generator.extract_tokens import main

    tokenizer = tiny_tokenizer()
    tokenizer.config.to_yaml(tmp_path / "tiny.yaml")
    save_file({k: v.contiguous() for k, v in tokenizer.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    argv = ["--tokenizer", str(tmp_path / "tiny.yaml"), "--tokenizer-weights", str(tmp_path / "tiny.safetensors"),
            "--source", "fashion_mnist", "--split", "test", "--limit", "5", "--no-hflip", "--workers", "0",
            "--shard-size", "3", "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    shards = TokenShards(tmp_path / "out")
    assert shards.labels.tolist() == [9, 2, 1, 1, 6]  # the first Fashion-MNIST test labels
    assert shards.plan.num_classes == 10 and shards.plan.tile_size == 64 and shards.num_variants == 1
    assert json.loads((tmp_path / "out" / "classes.json").read_text())[9] == "ankle boot"
    assert main(argv) == 0  # resuming a finished extraction does nothing and succeeds

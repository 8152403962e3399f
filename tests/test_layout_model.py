"""Issue 7 acceptance on CPU: a small layout model trained briefly on Fashion-MNIST layouts lowers the layout Frechet
distance (eval.layout) to held-out real layouts by at least half of its untrained value.

Real layouts are what the trainer sees after token extraction: the exact entropy partition (16 tokens, 32 px tile,
min_size 4) of Fashion-MNIST images scaled to the tile by extraction's own transform
(`generator.extraction.open_labelled_images`). They go into token shards through the shard writer the extractor
uses (`generator.shards`), without running an encoder: the layout stage reads only the init geometry, so a
placeholder texture channel stands in for the tokens. Both models sample through the two-stage path
(`generator.sampling.ModelLayouts`: layout model -> calibration), and the distance compares calibrated layouts
with the partitions of images the model never saw.

The untrained model is the trainer's initialisation (adaLN-Zero: zero velocity), whose layouts are calibrated
Gaussian noise around the mean layout: the honest "before" of the same model. Measured on the 2-core CI VM:
pooled distance 0.109 untrained, 0.034 trained (-69%); about 60 s in all with one torch thread.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from eval.layout import layout_report
from generator.config import SamplerConfig
from generator.extraction import open_labelled_images
from generator.models import build_model
from generator.sampling import ModelLayouts, class_balanced_labels
from generator.shards import ShardPlan, finalize_shards, write_plan, write_shard
from generator.training import GeneratorRunConfig, load_trained, train
from tokenizer.data import FASHION_MNIST_DIR
from tokenizer.engine import load_run_config
from tokenizer.partition import entropy_partition_batch

REPO = Path(__file__).resolve().parents[1]
TILE, TOKENS, MIN_SIZE, CLASSES = 32, 16, 4, 10
TRAIN, HELD_OUT, PER_CLASS = 2000, 500, 30


@pytest.fixture
def one_thread():
    """The model is tiny (1024 rows of width 128 per step): on a shared 2-core machine a second intra-op thread
    only contends, and made training ~5x slower in measurements."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fashion_layouts(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Entropy partitions (count, TOKENS, 5) and labels of the first `count` Fashion-MNIST test-split images (the
    test split's file decompresses in 0.1 s; the train split's takes seconds)."""
    try:
        images, _ = open_labelled_images("fashion_mnist", FASHION_MNIST_DIR, TILE, split="test", limit=count)
    except FileNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")
    pixels = np.stack([images[i][0] for i in range(count)])
    geometry, _ = entropy_partition_batch(pixels, TOKENS, min_size=MIN_SIZE, tile_size=TILE)
    return geometry, images.labels[:count]


def write_layout_shards(directory: Path, geometry: np.ndarray, labels: np.ndarray) -> None:
    plan = ShardPlan(num_samples=len(geometry), shard_size=len(geometry), num_tokens=TOKENS, token_dim=6,
                     num_classes=CLASSES, tile_size=TILE, min_size=MIN_SIZE, tokenizer="none (layouts only)")
    tokens = np.concatenate([geometry, np.zeros((*geometry.shape[:2], 1), np.float32)], axis=-1)
    write_plan(directory, plan)
    write_shard(directory, plan, 0, tokens[:, None], geometry[:, None], labels)
    finalize_shards(directory)


def test_brief_training_halves_the_layout_distance(tmp_path, one_thread):
    geometry, labels = fashion_layouts(TRAIN + HELD_OUT)
    write_layout_shards(tmp_path / "shards", geometry[:TRAIN], labels[:TRAIN])
    # layout_tiny at width 128 (4 heads): at width 64 the same budget reached only a ~55% drop, too thin a margin
    config, raw = load_run_config(GeneratorRunConfig, REPO / "configs" / "layout_tiny.yaml", [
        f"data.shards={tmp_path / 'shards'}", f"engine.output_dir={tmp_path / 'run'}", "engine.max_steps=600",
        "engine.checkpoint_every=600", "engine.ema_decay=0.99", "engine.log_every=100", "preview.every=0",
        "optimizer.lr=3e-3", "model.hidden_size=128", "model.num_heads=4"])
    torch.manual_seed(0)
    untrained = build_model(config.model).eval()
    train(config, raw)
    trained, space, _ = load_trained(tmp_path / "run")

    sample_labels = class_balanced_labels(PER_CLASS, CLASSES)
    sampler = SamplerConfig(method="euler", num_steps=10)
    reports = {}
    for name, model in (("untrained", untrained), ("trained", trained)):
        source = ModelLayouts(model, space, sampler, seed=0, tile_size=TILE, min_size=MIN_SIZE)
        generated = source.layouts(sample_labels.tolist(), list(range(len(sample_labels)))).numpy()
        reports[name] = layout_report(generated, geometry[TRAIN:], sample_labels, labels[TRAIN:], calibrate=False,
                                      tile_size=TILE, min_size=MIN_SIZE)
    before, after = reports["untrained"], reports["trained"]
    assert before["classes_skipped"] == after["classes_skipped"] == []
    assert after["frechet_distance"] <= 0.5 * before["frechet_distance"], (before, after)
    assert after["frechet_distance_class_mean"] <= 0.5 * before["frechet_distance_class_mean"], (before, after)

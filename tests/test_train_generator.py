"""Generator training on tiny token shards: the loss falls, resume is exact, NaN stops cleanly, bad configs fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import generator.training as training
from generator.models import build_model
from generator.shards import ShardPlan, TokenShardDataset, TokenShards, finalize_shards, write_plan, write_shard
from generator.spaces import JointSpace, LayoutSpace, canonical_order
from generator.training import GeneratorRunConfig, NonFiniteLossError, build_space, heldout_loss, load_trained, train
from tiny_generation import cached_shards, tiny_tokenizer
from tokenizer.engine import config_to_dict, find_checkpoints, load_run_config, read_metrics

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, name: str, shards: Path, *overrides: str, config: str = "dit_tiny"):
    settings = [f"engine.output_dir={tmp_path / name}", f"data.shards={shards}", *overrides]
    return load_run_config(GeneratorRunConfig, REPO / "configs" / f"{config}.yaml", settings)


def heldout_batch(count: int = 6) -> dict[str, torch.Tensor]:
    dataset = TokenShardDataset(TokenShards(cached_shards(count, seed=1, hflip=False)))
    return torch.utils.data.default_collate([dataset[i] for i in range(count)])


def test_texture_training_lowers_the_heldout_loss(tmp_path):
    shards = cached_shards(20)
    tokenizer = tiny_tokenizer()
    tokenizer.config.to_yaml(tmp_path / "tokenizer.yaml")
    save_file({k: v.contiguous() for k, v in tokenizer.state_dict().items()}, str(tmp_path / "tokenizer.safetensors"))
    config, raw = tiny_config(tmp_path, "texture", shards, "engine.max_steps=100", "engine.checkpoint_every=100",
                              "preview.every=100", f"preview.tokenizer={tmp_path / 'tokenizer.yaml'}",
                              f"preview.tokenizer_weights={tmp_path / 'tokenizer.safetensors'}")
    space = build_space(config, TokenShards(shards))
    held_out = heldout_batch()
    torch.manual_seed(0)
    before = heldout_loss(build_model(config.model), space, held_out)
    weights = train(config, raw)
    model, loaded_space, _ = load_trained(tmp_path / "texture")
    after = heldout_loss(model, loaded_space, held_out)
    assert loaded_space == space
    assert after <= 0.7 * before, (before, after)
    records = read_metrics(tmp_path / "texture")
    assert records[-1]["step"] == 100 and "images_per_s" in records[-1] and "loss" in records[-1]
    assert weights.name == "ema.safetensors"
    grid = np.array(Image.open(tmp_path / "texture" / "images" / "samples_00000100.png"))
    assert grid.shape[0] >= 64 and grid.shape[1] >= 6 * 64 and grid.std() > 0  # 6 decoded samples in one row


def test_resume_continues_exactly(tmp_path):
    shards = cached_shards(20)
    common = ("engine.checkpoint_every=6", "engine.log_every=1", "engine.deterministic=true")
    config, raw = tiny_config(tmp_path, "straight", shards, "engine.max_steps=12", *common)
    train(config, raw)
    config, raw = tiny_config(tmp_path, "split", shards, "engine.max_steps=6", *common)
    train(config, raw)
    config, raw = tiny_config(tmp_path, "split", shards, "engine.max_steps=12", *common)
    train(config, raw, resume="auto")
    straight, split = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 13))
    assert [r["loss"] for r in split] == pytest.approx([r["loss"] for r in straight], rel=1e-5)
    a, b = (load_trained(tmp_path / name)[0].state_dict() for name in ("straight", "split"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_activation_checkpointing_logs_the_same_losses(tmp_path):
    """engine.activation_checkpointing (each block recomputed in the backward) trains exactly as without it."""
    shards = cached_shards(20)
    common = ("engine.max_steps=4", "engine.log_every=1", "engine.checkpoint_every=4")
    losses = []
    for name, switch in (("plain", "false"), ("recomputed", "true")):
        config, raw = tiny_config(tmp_path, name, shards, *common, f"engine.activation_checkpointing={switch}")
        train(config, raw)
        losses.append([r["loss"] for r in read_metrics(tmp_path / name)])
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    shards = cached_shards(20)
    config, raw = tiny_config(tmp_path, "nan", shards, "engine.max_steps=10", "engine.checkpoint_every=4")
    real_loss = training.velocity_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(training, "velocity_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 7") as error:
        train(config, raw)
    checkpoints = find_checkpoints(tmp_path / "nan")
    assert [c.name for c in checkpoints] == ["step_00000004"]
    assert error.value.last_checkpoint == checkpoints[0]
    assert json.loads((checkpoints[0] / "progress.json").read_text())["step"] == 4


def test_layout_and_one_stage_spaces(tmp_path):
    shards = TokenShards(cached_shards(20))
    layout_config, _ = tiny_config(tmp_path, "layout", shards.directory, config="layout_tiny")
    layout_space = build_space(layout_config, shards)
    assert isinstance(layout_space, LayoutSpace)
    batch = torch.utils.data.default_collate([TokenShardDataset(shards)[i] for i in range(4)])
    x, condition = layout_space.to_flow(batch["tokens"], batch["layout"])
    assert condition is None and x.shape == (4, 16, 5)
    restored = layout_space.to_layout(x)
    assert torch.equal(canonical_order(restored), torch.arange(16).expand(4, 16))  # sorted raster order
    # the same set of regions, reordered
    assert torch.allclose(restored.sort(dim=1).values, batch["layout"].sort(dim=1).values, atol=1e-5)

    one_stage = load_run_config(GeneratorRunConfig, REPO / "configs" / "dit_tiny.yaml",
                                ["stage=one_stage", "model.layout_channels=null", "model.pos_embed=true",
                                 f"data.shards={shards.directory}"])[0]
    joint = build_space(one_stage, shards)
    assert isinstance(joint, JointSpace)
    x, condition = joint.to_flow(batch["tokens"], batch["layout"])
    tokens = joint.to_tokens(x)
    assert condition is None and torch.allclose(tokens.sort(dim=1).values, batch["tokens"].sort(dim=1).values,
                                                atol=1e-4)


@pytest.mark.slow
def test_each_process_draws_its_own_noise(tmp_path):
    """Every sample is the same image: were the noise, times and label dropout the same on both processes (the
    engine seeds them alike), a 2-process step would see two copies of one 1-process batch and log its loss."""
    source = TokenShards(cached_shards(20))
    tokens, layout, label = source.sample(0)
    plan = ShardPlan(num_samples=16, shard_size=16, num_tokens=source.plan.num_tokens,
                     token_dim=source.plan.token_dim, num_classes=source.plan.num_classes)
    write_plan(tmp_path / "shards", plan)
    write_shard(tmp_path / "shards", plan, 0, np.broadcast_to(tokens, (16, 1, *tokens.shape)),
                np.broadcast_to(layout, (16, 1, *layout.shape)), np.full(16, label))
    finalize_shards(tmp_path / "shards")
    settings = ("data.batch_size=4", "engine.max_steps=1", "engine.log_every=1")
    config, raw = tiny_config(tmp_path, "one", tmp_path / "shards", *settings)
    train(config, raw)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "generator" / "train_dit.py"),
         "--config", str(REPO / "configs" / "dit_tiny.yaml"), f"data.shards={tmp_path / 'shards'}",
         f"engine.output_dir={tmp_path / 'two'}", *settings],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in (tmp_path / "two" / "train.log").read_text()
    one, two = (read_metrics(tmp_path / name)[0]["loss"] for name in ("one", "two"))
    assert two != pytest.approx(one, rel=1e-3)


def test_bad_configs_name_the_problem(tmp_path):
    shards = cached_shards(20)
    config, _ = tiny_config(tmp_path, "few_classes", shards, "model.num_classes=2")
    with pytest.raises(ValueError, match="3 classes.*num_classes = 2"):
        build_space(config, TokenShards(shards))
    config, _ = tiny_config(tmp_path, "channels", shards, "model.in_channels=21")
    with pytest.raises(ValueError, match="in_channels = 21"):
        build_space(config, TokenShards(shards))
    with pytest.raises(ValueError, match="layout_channels must be null"):
        tiny_config(tmp_path, "stage", shards, "stage=layout")
    with pytest.raises(ValueError, match="no key 'lrate'"):
        tiny_config(tmp_path, "typo", shards, "optimizer.lrate=1")


def test_released_size_configs_build():
    for name in ("dit_xl_m128", "dit_xl_m128_one_stage", "layout_s", "dit_fashion_s", "layout_tiny"):
        config, raw = load_run_config(GeneratorRunConfig, REPO / "configs" / f"{name}.yaml")
        assert config_to_dict(config) == raw
    xl = load_run_config(GeneratorRunConfig, REPO / "configs" / "dit_xl_m128.yaml")[0]
    assert (xl.model.depth, xl.model.hidden_size, xl.statistics, xl.flow.layout_noise_std) == (28, 1152, "m128", 0.5)
    with torch.device("meta"):
        assert 670e6 < sum(p.numel() for p in build_model(xl.model).parameters()) < 680e6


@pytest.mark.slow
def test_train_layout_script_runs(tmp_path):
    shards = cached_shards(20)
    result = subprocess.run([sys.executable, str(REPO / "generator" / "train_layout.py"), "--config",
                             str(REPO / "configs" / "layout_tiny.yaml"), f"engine.output_dir={tmp_path / 'run'}",
                             f"data.shards={shards}", "engine.max_steps=4", "preview.every=2"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "ema.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "images").iterdir()) == [
        "samples_00000002.png", "samples_00000004.png"]

"""generator/sample.py end to end on CPU: tiny tokenizer + tiny generators, .npz layout, resumption, layouts."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import generator.sampling as sampling
from eval.layout import layout_report
from generator.calibration import calibrate_layouts
from generator.config import SamplerConfig
from generator.models import build_model
from generator.sample import main
from generator.samplers import time_grid
from generator.shards import TokenShards
from generator.spaces import space_to_dict
from generator.training import EMA_FILE, SPACE_FILE, GeneratorRunConfig, build_space
from tiny_generation import cached_shards, tiny_tokenizer
from tokenizer.engine import config_to_dict, load_run_config

REPO = Path(__file__).resolve().parents[1]


def fake_run(directory: Path, config_name: str, shards: Path, *overrides: str, seed: int = 0) -> Path:
    """A generator run directory as train() leaves it, with random (but not zero-output) weights."""
    config, _ = load_run_config(GeneratorRunConfig, REPO / "configs" / f"{config_name}.yaml",
                                [f"data.shards={shards}", *overrides])
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(json.dumps(config_to_dict(config)))
    (directory / SPACE_FILE).write_text(json.dumps(space_to_dict(build_space(config, TokenShards(shards)))))
    torch.manual_seed(seed)
    model = build_model(config.model)
    with torch.no_grad():  # leave adaLN-Zero's all-zero output: the velocity then depends on the inputs
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / EMA_FILE))
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    shards = cached_shards(20)
    tokenizer = tiny_tokenizer()
    tokenizer.config.to_yaml(root / "tokenizer.yaml")
    save_file({k: v.contiguous() for k, v in tokenizer.state_dict().items()}, str(root / "tokenizer.safetensors"))
    return {"root": root, "shards": shards, "texture": fake_run(root / "texture", "dit_tiny", shards),
            "tokenizer": ["--tokenizer", str(root / "tokenizer.yaml"),
                          "--tokenizer-weights", str(root / "tokenizer.safetensors")]}


def sample(setup, output: Path, *extra: str, generator: str = "texture") -> int:
    return main(["--generator", str(setup[generator]), *setup["tokenizer"], "--output", str(output),
                 "--method", "sde", "--steps", "4", "--seed", "3", *extra])


def test_end_to_end_npz_and_resumption(setup, monkeypatch):
    output = setup["root"] / "run"
    args = ("--layout", "shards", "--shards", str(setup["shards"]), "--per-class", "2", "--batch-size", "3",
            "--chunk-size", "4", "--png")
    assert sample(setup, output, *args) == 0
    with np.load(output / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
        assert images.dtype == np.uint8 and images.shape == (6, 64, 64, 3)
        assert labels.tolist() == [0, 1, 2, 0, 1, 2] and data["labels"].tolist() == labels.tolist()
    assert images.std() > 0
    assert sorted(p.name for p in (output / "images").iterdir()) == [f"{i:06d}.png" for i in range(6)]
    assert sorted(p.name for p in (output / "chunks").iterdir()) == ["chunk_00000.npz", "chunk_00001.npz"]
    with np.load(output / "layouts.npz") as saved:  # real layouts: valid tilings already, nothing raw to keep
        assert saved["geometry"].shape == (6, 16, 5) and "raw" not in saved.files

    # a killed run: the second chunk and the merged file are missing; only that chunk is generated again
    (output / "chunks" / "chunk_00001.npz").unlink()
    (output / "samples.npz").unlink()
    generated = []
    original = sampling.TokenGenerator.tokens
    monkeypatch.setattr(sampling.TokenGenerator, "tokens",
                        lambda self, labels, ids: generated.extend(ids) or original(self, labels, ids))
    assert sample(setup, output, *args) == 0
    assert generated == [4, 5]
    with np.load(output / "samples.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], images)

    with pytest.raises(ValueError, match=r"other settings \(differing: \['seed'\]\)"):
        main(["--generator", str(setup["texture"]), *setup["tokenizer"], "--output", str(output), "--method",
              "sde", "--steps", "4", "--seed", "4", *args])


def test_samples_do_not_depend_on_batching(setup):
    common = ("--layout", "shards", "--shards", str(setup["shards"]), "--num-samples", "5")
    sample(setup, setup["root"] / "batched", *common, "--batch-size", "5")
    sample(setup, setup["root"] / "single", *common, "--batch-size", "2", "--chunk-size", "3")
    with np.load(setup["root"] / "batched" / "samples.npz") as a, np.load(setup["root"] / "single" / "samples.npz") as b:
        assert a["arr_1"].tolist() == b["arr_1"].tolist()
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # float summation order only


def test_guidance_rows_only_inside_the_interval(setup):
    from generator.training import load_trained

    model, space, _ = load_trained(setup["texture"])
    config = SamplerConfig(method="sde", num_steps=10, guidance_scale=1.5, guidance_low=0.2)
    generator = sampling.TokenGenerator(model, space, config, sampling.ShardLayouts(TokenShards(setup["shards"])))
    generator.tokens([0, 1, 2], [0, 1, 2])
    times = time_grid(config.sde_t0, 1 - config.last_step_size, config.num_steps)
    guided = sum(config.guidance_low <= t <= config.guidance_high for t in times)
    assert generator.rows == 3 * (len(times) + guided)


@pytest.mark.slow
def test_compiled_sampling_equals_eager(setup):
    from generator.training import load_trained

    config = SamplerConfig(method="sde", num_steps=6, guidance_scale=1.5, guidance_low=0.2)
    results = []
    for compile in (False, True):
        model, space, _ = load_trained(setup["texture"])
        generator = sampling.TokenGenerator(model, space, config, sampling.ShardLayouts(TokenShards(setup["shards"])),
                                            compile=compile)
        results.append(generator.tokens([0, 1, 2], [0, 1, 2]))
    assert torch.allclose(results[0], results[1], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_two_processes_share_the_chunks_and_match_one(setup):
    """`accelerate launch` of sample.py on 1 and on 2 CPU processes (gloo): the processes split the chunks, and
    the samples are the same bits (one thread each, so even CPU float sums run in the same order)."""
    outputs = {n: setup["root"] / f"launched_{n}" for n in (1, 2)}
    logs = {}
    for processes, output in outputs.items():
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                   *(["--multi_gpu"] if processes > 1 else []), "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", str(REPO / "generator" / "sample.py"),
                   "--generator", str(setup["texture"]), *setup["tokenizer"], "--output", str(output),
                   "--method", "sde", "--steps", "4", "--seed", "3",
                   "--layout", "shards", "--shards", str(setup["shards"]), "--per-class", "2", "--batch-size", "2",
                   "--chunk-size", "2"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        logs[processes] = result
    assert "sample[1]" in logs[2].stderr and "sample[1]" not in logs[1].stderr  # the second process sampled too
    assert logs[2].stdout.count("samples:") == 1  # and only the main process merged
    with np.load(outputs[1] / "samples.npz") as one, np.load(outputs[2] / "samples.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])


def test_two_stage_with_the_layout_model(setup):
    layout_run = fake_run(setup["root"] / "layout_model", "layout_tiny", setup["shards"], "model.num_classes=3")
    output = setup["root"] / "two_stage"
    assert sample(setup, output, "--layout", "model", "--layout-weights", str(layout_run), "--layout-steps", "3",
                  "--per-class", "1") == 0
    with np.load(output / "samples.npz") as data:
        assert data["arr_0"].shape == (3, 64, 64, 3)
    from generator.training import load_trained

    model, space, _ = load_trained(layout_run)
    with np.load(output / "layouts.npz") as saved:  # the layouts the texture model got, and the raw model output
        cli_sampler = SamplerConfig(method="euler", num_steps=3, guidance_scale=1.0, guidance_low=0.0)
        again = sampling.ModelLayouts(model, space, cli_sampler, seed=3, tile_size=64)
        raw, calibrated = again.sample([0, 1, 2], [0, 1, 2])
        assert saved["labels"].tolist() == [0, 1, 2] and (int(saved["tile_size"]), int(saved["min_size"])) == (64, 8)
        np.testing.assert_array_equal(saved["geometry"], calibrated.geometry)
        np.testing.assert_allclose(saved["raw"], raw, atol=1e-5)
    source = sampling.ModelLayouts(model, space, SamplerConfig(method="euler", num_steps=3), seed=1, tile_size=64)
    layouts = source.layouts([0, 1, 2, 0], [0, 1, 2, 3]).numpy()
    assert layouts.shape == (4, 16, 5)
    # calibrated: a valid tiling, so calibrating it again gives the same regions (possibly in another order)
    again = calibrate_layouts(layouts, tile_size=64)
    assert again.exact.all()
    as_set = lambda g: np.sort(g.view([("", g.dtype)] * 5).ravel())  # noqa: E731
    for before, after in zip(layouts, again.geometry):
        assert np.array_equal(as_set(np.ascontiguousarray(before)), as_set(np.ascontiguousarray(after)))
    assert np.array_equal(layouts, source.layouts([0, 1, 2, 0], [0, 1, 2, 3]).numpy())


def test_initg_layouts_and_one_stage(setup):
    shards = TokenShards(setup["shards"])
    bank = {c: [np.array(shards.sample(int(i))[1]) for i in shards.indices_of_class(c)] for c in range(3)}
    (setup["root"] / "initg.pickle").write_bytes(pickle.dumps(bank))
    assert sample(setup, setup["root"] / "initg", "--layout", "initg", "--initg", str(setup["root"] / "initg.pickle"),
                  "--per-class", "2") == 0

    setup["joint"] = fake_run(setup["root"] / "joint", "dit_tiny", setup["shards"], "stage=one_stage",
                              "model.layout_channels=null", "model.pos_embed=true", "flow.layout_noise_std=0.0")
    assert sample(setup, setup["root"] / "joint_out", "--num-samples", "2", generator="joint") == 0
    with np.load(setup["root"] / "joint_out" / "samples.npz") as data:
        assert data["arr_0"].shape == (2, 64, 64, 3)


def test_bad_input_is_refused(setup, capsys):
    with pytest.raises(SystemExit):
        sample(setup, setup["root"] / "bad1", "--per-class", "1")
    assert "needs --layout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample(setup, setup["root"] / "bad2", "--layout", "shards", "--shards", str(setup["shards"]),
               "--per-class", "1", "--num-classes", "7")
    assert "outside the model's 1..3 classes" in capsys.readouterr().err
    model = build_model(load_run_config(GeneratorRunConfig, REPO / "configs" / "dit_tiny.yaml")[0].model)
    generator = sampling.TokenGenerator(model, build_space(
        load_run_config(GeneratorRunConfig, REPO / "configs" / "dit_tiny.yaml",
                        [f"data.shards={setup['shards']}"])[0], TokenShards(setup["shards"])),
        SamplerConfig(method="euler", num_steps=1), sampling.ShardLayouts(TokenShards(setup["shards"])))
    with pytest.raises(ValueError, match=r"labels \[5\] outside the model's 3 classes"):
        generator.tokens([0, 5], [0, 1])



@pytest.fixture
def two_stage_layouts(setup, tmp_path):
    """A two-stage run (6 samples) and real layouts from the shards: (run folder, real layouts npz, their arrays)."""
    layout_run = setup["root"] / "layout_model"
    if not layout_run.is_dir():
        fake_run(layout_run, "layout_tiny", setup["shards"], "model.num_classes=3")
    output = tmp_path / "two_stage"
    assert sample(setup, output, "--layout", "model", "--layout-weights", str(layout_run), "--layout-steps", "3",
                  "--per-class", "2") == 0
    shards = TokenShards(setup["shards"])
    real = np.stack([np.array(shards.sample(i)[1]) for i in range(len(shards))])
    np.savez(tmp_path / "real.npz", geometry=real, labels=shards.labels)
    with np.load(output / "layouts.npz") as saved:
        expected = layout_report(saved["raw"], real, saved["labels"], shards.labels, tile_size=64, min_size=8)
    return output, tmp_path / "real.npz", expected


def test_layout_metrics_of_a_sample_run(two_stage_layouts, tmp_path, capsys):
    """eval.layout.layout_metrics on sample.py's layouts.npz: the report of the raw layouts, calibrated as sampled;
    eval/fid.py refuses a bad layouts file before any Inception work."""
    from eval.fid import main as fid_main
    from eval.layout import layout_metrics

    output, real, expected = two_stage_layouts
    result = layout_metrics(output / "layouts.npz", real)
    assert result["metrics"] == {"layout_fd": expected["frechet_distance"],
                                 "layout_fd_class_mean": expected["frechet_distance_class_mean"],
                                 "layout_exact_fraction": expected["exact_fraction"]}
    np.savez(tmp_path / "bad.npz", layouts=np.zeros((2, 16, 5)))
    assert fid_main([str(output / "samples.npz"), str(output / "samples.npz"), "--layouts", str(tmp_path / "bad.npz"),
                     str(real)]) == 2
    assert "missing array(s) ['geometry', 'labels']" in capsys.readouterr().err


@pytest.mark.slow
def test_fid_cli_adds_the_layout_metrics(two_stage_layouts, tmp_path):
    """eval/fid.py --layouts end to end (TF-Inception on CPU: about a minute here)."""
    from eval.fid import main as fid_main
    from eval.inception import resolve_weights_path

    try:
        resolve_weights_path()
    except FileNotFoundError as error:
        pytest.skip(f"no offline Inception weights: {error}")
    output, real, expected = two_stage_layouts
    assert fid_main([str(output / "samples.npz"), str(output / "samples.npz"), "--device", "cpu", "--quiet",
                     "--workers", "0", "--cache-dir", "", "--out", str(tmp_path / "report"), "--layouts",
                     str(output / "layouts.npz"), str(real)]) == 0
    metrics = json.loads((tmp_path / "report.json").read_text())["metrics"]
    assert metrics["layout_fd"] == pytest.approx(expected["frechet_distance"])
    assert metrics["layout_fd_class_mean"] == pytest.approx(expected["frechet_distance_class_mean"])
    assert metrics["layout_exact_fraction"] == expected["exact_fraction"] and "fid" in metrics
    assert "layout_fd" in (tmp_path / "report.md").read_text()

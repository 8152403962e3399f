"""The shared training machinery on a toy model: configs, data order, exact resume after a kill, keep-last-K,
atomic checkpoints, the NaN stop, EMA export and the multi-process loss curve."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokenizer.engine import (EngineConfig, ShardedInfiniteSampler, TrainingEngine, apply_overrides, build_config,
                              covered_length, find_checkpoints, read_metrics)

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "engine_toy_run.py"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


_spec = importlib.util.spec_from_file_location("engine_toy_run", TOY)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def run_toy(output: Path, *args: str) -> int:
    """The toy trainer in this process (a subprocess costs seconds of imports on a busy CI machine)."""
    return toy.main(["--output", str(output), *args])


def losses(output: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["mse"], r["loss"]) for r in read_metrics(output)]


# ---- configs --------------------------------------------------------------------------------------------------

@dataclass
class _Inner:
    rate: float = 1.0
    betas: tuple[float, float] = (0.5, 0.9)
    name: str | None = None


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    flag: bool = False
    steps: int = 3


def test_overrides_are_typed_and_typos_are_errors():
    data = {"inner": {"rate": 1.0, "betas": [0.5, 0.9], "name": None}, "flag": False, "steps": 3}
    config = build_config(_Outer, apply_overrides(data, ["inner.rate=2e-4", "flag=true", "inner.betas=[0.1, 0.2]",
                                                         "inner.name=abc"]))
    assert config.inner.rate == 2e-4 and config.flag is True and config.inner.betas == (0.1, 0.2)
    assert config.inner.name == "abc"
    # YAML 1.1 would read `no` as False; on the command line it is the mixed-precision word.
    engine = build_config(EngineConfig, apply_overrides({"mixed_precision": "bf16"}, ["mixed_precision=no"]))
    assert engine.mixed_precision == "no"
    with pytest.raises(ValueError, match=r"config.flag: expected bool, got 'yes'"):
        build_config(_Outer, apply_overrides(data, ["flag=yes"]))
    with pytest.raises(ValueError, match="no key 'rat' under inner"):
        apply_overrides(data, ["inner.rat=1"])
    with pytest.raises(ValueError, match="key.sub=value"):
        apply_overrides(data, ["inner.rate"])
    with pytest.raises(ValueError, match=r"config.steps: expected int, got 'x'"):
        build_config(_Outer, {"steps": "x"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\]"):
        build_config(_Outer, {"stepz": 1})
    with pytest.raises(ValueError, match="mixed_precision"):
        EngineConfig(mixed_precision="fp16")


# ---- data order -----------------------------------------------------------------------------------------------

def test_sampler_shards_are_disjoint_and_match_single_process_batches():
    n, batch, shards = 50, 4, 2
    single = iter(ShardedInfiniteSampler(n, seed=3))
    sharded = [iter(ShardedInfiniteSampler(n, seed=3, num_shards=shards, shard_index=r)) for r in range(shards)]
    per_shard_epoch = [[next(s)[0] for _ in range(n // shards)] for s in sharded]
    assert not set(per_shard_epoch[0]) & set(per_shard_epoch[1])  # no duplicates within an epoch
    assert len(set(per_shard_epoch[0]) | set(per_shard_epoch[1])) == n

    sharded = [iter(ShardedInfiniteSampler(n, seed=3, num_shards=shards, shard_index=r)) for r in range(shards)]
    for _ in range(30):  # crosses epochs
        global_batch = {next(single) for _ in range(batch * shards)}
        shard_batches = {next(s) for s in sharded for _ in range(batch)}
        assert global_batch == shard_batches  # same images and same augmentation seeds


def test_sampler_start_equals_skipping():
    full = iter(ShardedInfiniteSampler(37, seed=1, num_shards=2, shard_index=1))
    for _ in range(41):
        next(full)
    resumed = iter(ShardedInfiniteSampler(37, seed=1, num_shards=2, shard_index=1, start=41))
    assert [next(full) for _ in range(60)] == [next(resumed) for _ in range(60)]


# ---- runs ----------------------------------------------------------------------------------------------------

def test_resume_after_kill_continues_identically(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_toy(reference, "--steps", "30", "--accum", "2", "--workers", "1")

    process = subprocess.Popen([sys.executable, str(TOY), "--output", str(killed), "--steps", "30", "--accum", "2",
                                "--workers", "1", "--sleep", "0.15"],
                               env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(r["step"] >= 12 for r in read_metrics(killed)):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # no clean exit: no final checkpoint, maybe a half-written one
    process.wait()
    newest = find_checkpoints(killed)[-1]
    assert 10 <= int(newest.name.split("_")[1]) < 30

    assert run_toy(killed, "--steps", "30", "--accum", "2", "--workers", "1", "--resume", "auto") == 0
    assert losses(killed) == losses(reference)  # bit-identical, including records before the kill
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, 31))
    ema_a, ema_b = load_file(reference / "ema.safetensors"), load_file(killed / "ema.safetensors")
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_keep_last_k_and_fresh_run_into_used_folder_is_refused(tmp_path):
    run_toy(tmp_path, "--steps", "12", "--checkpoint-every", "3", "--keep", "2")
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000009", "step_00000012"]
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))
    with pytest.raises(FileExistsError, match="--resume auto"):
        run_toy(tmp_path, "--steps", "12")


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, capsys):
    assert run_toy(tmp_path, "--steps", "20", "--nan-at", "8", "--checkpoint-every", "5") == 3
    message = capsys.readouterr().err
    assert "loss 'mse' is nan at step 8" in message and "step_00000005" in message
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000005"]
    assert "loss 'mse' is nan at step 8" in (tmp_path / "train.log").read_text()
    assert run_toy(tmp_path, "--steps", "6", "--resume", "auto") == 0  # the kept checkpoint loads
    assert read_metrics(tmp_path)[-1]["step"] == 6


def test_nan_guard_reads_at_log_steps_and_names_the_first_bad_step(tmp_path, capsys):
    # The guard's flags are read only every 5 steps: the NaN of step 8 stops the run at step 10, named as step 8,
    # and the checkpoint of step 10 (after the bad step) is never written.
    assert run_toy(tmp_path, "--steps", "20", "--nan-at", "8", "--checkpoint-every", "5", "--log-every", "5") == 3
    assert "loss 'mse' is nan at step 8" in capsys.readouterr().err
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000005"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [5]


def test_profile_window_writes_operator_tables(tmp_path):
    assert run_toy(tmp_path, "--steps", "6", "--profile-at", "3") == 0
    report = (tmp_path / "profile.txt").read_text()
    assert report.startswith("torch.profiler over steps 4-5 (2 steps") and "aten::addmm" in report


def test_profile_busy_time_counts_overlapping_kernels_once():
    assert covered_length([]) == 0.0
    assert covered_length([(5.0, 7.0), (0.0, 2.0), (1.0, 3.0), (2.5, 2.75), (7.0, 8.0)]) == 3.0 + 3.0


def test_channels_last_modules_checkpoint_as_contiguous_tensors(tmp_path):
    engine = TrainingEngine(EngineConfig(output_dir=str(tmp_path), max_steps=2, channels_last=True))
    model = engine.to_memory_format(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1)))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) and not model[0].weight.is_contiguous()
    assert all(v.is_contiguous() for v in model.state_dict().values())
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer = engine.prepare(model, optimizer)
    engine.track_ema(model)
    assert engine.resume("auto") == 0
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    engine.save_checkpoint(1)   # safetensors refuses non-contiguous tensors
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert engine.resume("auto") == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    engine.finish()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    engine = TrainingEngine(EngineConfig(output_dir=str(tmp_path), max_steps=5, checkpoint_every=1))
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer = engine.prepare(model, optimizer)
    engine.track_ema(model)
    assert engine.resume("auto") == 0
    good = engine.save_checkpoint(1)
    saved_weight = model.weight.detach().clone()

    def crash(output_dir, **kwargs):
        Path(output_dir, "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(engine.accelerator, "save_state", crash)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        engine.save_checkpoint(2)
    assert find_checkpoints(tmp_path) == [good]
    monkeypatch.undo()
    assert engine.resume("auto") == 1
    assert torch.equal(model.weight.detach(), saved_weight)
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))  # the partial folder is cleaned on resume
    engine.finish()


def test_ema_export_holds_the_averaged_weights(tmp_path):
    run_toy(tmp_path, "--steps", "5")
    exported = load_file(tmp_path / "ema.safetensors")
    assert set(exported) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    final = load_file(find_checkpoints(tmp_path)[-1] / "model.safetensors")
    assert not torch.equal(exported["0.weight"], final["0.weight"])  # averaged, not the live weights


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_toy(one, "--steps", "6", "--batch", "8") == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
              str(TOY), "--output", str(two), "--steps", "6", "--batch", "4"]
    result = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in (two / "train.log").read_text()
    for a, b in zip(losses(one), losses(two), strict=True):
        assert a[0] == b[0] and a[1:] == pytest.approx(b[1:], rel=1e-5)

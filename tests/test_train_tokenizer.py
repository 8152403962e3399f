"""Tokenizer training end to end on CPU (tiny config, Fashion-MNIST) and the loss terms."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tokenizer.engine import find_checkpoints, read_metrics
from tokenizer.losses import LossConfig, LPIPSLoss, PatchDiscriminator, TokenizerLosses, adaptive_gan_weight, \
    hinge_discriminator_loss
from tokenizer.train import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "train_tiny_fashion.yaml")
needs_fashion = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
                                   reason="Debian package dataset-fashion-mnist is not installed")


def heldout_curve(output: Path) -> dict[int, float]:
    return {r["step"]: r["heldout_psnr"] for r in read_metrics(output) if "heldout_psnr" in r}


@needs_fashion
def test_heldout_psnr_rises_and_ema_export_loads(tmp_path):
    assert main(["--config", CONFIG, f"engine.output_dir={tmp_path}", "engine.max_steps=40", "optim.batch_size=8",
                 "monitor.heldout_every=40", "monitor.heldout_images=32", "monitor.image_every=40",
                 "engine.log_every=10", "engine.checkpoint_every=40"]) == 0
    curve = heldout_curve(tmp_path)
    assert curve[40] - curve[0] >= 3.0, curve
    assert (tmp_path / "images" / "reconstruction_00000040.png").is_file()
    assert (tmp_path / "config.yaml").is_file() and read_metrics(tmp_path)[-1]["skipped_files"] == 0

    from tokenizer.official import load_released

    model = load_released(tmp_path / "ema.safetensors", "gpstoken_tiny32")  # strict keys and shapes
    assert model.num_parameters() > 0


def _train_process(*args: str) -> subprocess.Popen:
    """tokenizer/train.py in a subprocess with one CPU thread (the same float sums in every process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, str(REPO / "tokenizer" / "train.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 120) -> None:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]


def loss_records(output: Path) -> list[dict[str, float]]:
    """Every logged number of a run except timings."""
    timing = {"images_per_s", "data_wait_ms", "peak_memory_gib"}
    return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(output)]


def short_gan_run(steps: int, *overrides: str) -> list[str]:
    """Arguments of a few logged steps of the tiny config, batch 2, with the GAN on from the first step."""
    return ["--config", CONFIG, "engine.log_every=1", f"engine.max_steps={steps}", "optim.batch_size=2",
            "monitor.heldout_every=0", "monitor.image_every=0", "data.num_workers=0", "losses.gan_weight=0.3",
            "losses.gan_start=0", *overrides]


@needs_fashion
def test_resume_after_kill_continues_identically(tmp_path):
    """SIGKILL while training past a checkpoint; `--resume auto` then logs exactly the uninterrupted run's
    numbers (every loss term, GAN included, every step), and the kill left no checkpoint that resume could
    mistake for a complete one."""
    common = ["--config", CONFIG, "engine.log_every=1", "engine.checkpoint_every=3", "engine.deterministic=true",
              "optim.batch_size=4", "monitor.heldout_every=0", "monitor.image_every=0", "data.num_workers=0",
              "losses.gan_weight=0.3", "losses.gan_start=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = _train_process(*common, f"engine.output_dir={straight}", "engine.max_steps=9")
    # A long run, so it is surely still training when it is killed: once its first checkpoint (step 3) is
    # complete and a later step has been logged.
    victim = _train_process(*common, f"engine.output_dir={killed}", "engine.max_steps=100000")
    deadline = time.monotonic() + 120
    while not (find_checkpoints(killed) and any(r["step"] > 3 for r in read_metrics(killed))):
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    _finish(reference)

    complete = find_checkpoints(killed)
    assert complete and all((c / "model.safetensors").is_file() and (c / "optimizer.bin").is_file() for c in complete)
    others = {p.name for p in (killed / "checkpoints").iterdir()} - {c.name for c in complete}
    assert all(name.startswith(".tmp_") for name in others), others   # a save cut short stays hidden
    resumed_from = int(complete[-1].name.split("_")[1])
    assert 3 <= resumed_from < 9 and not (killed / "ema.safetensors").exists()

    resumed = _train_process(*common, f"engine.output_dir={killed}", "engine.max_steps=9", "--resume", "auto")
    _finish(resumed)
    assert f"(step {resumed_from})" in (killed / "train.log").read_text()
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, 10))
    assert loss_records(killed) == loss_records(straight)   # bit-identical, before and after the kill
    assert any("gan_discriminator" in r for r in loss_records(straight)[resumed_from:])
    assert not list((killed / "checkpoints").glob(".tmp_*"))


@needs_fashion
def test_gan_schedules_and_images_counted(tmp_path):
    """same_batch: every step updates the tokenizer and then the discriminator; alternate (released): even steps
    update only the discriminator, on a batch of their own, and count no tokenizer images."""
    common = short_gan_run(4)
    assert main([*common, f"engine.output_dir={tmp_path / 'same'}"]) == 0
    assert main([*common, f"engine.output_dir={tmp_path / 'alternate'}", "losses.gan_schedule=alternate"]) == 0
    same, alternate = read_metrics(tmp_path / "same"), read_metrics(tmp_path / "alternate")
    assert all({"pixel", "gan_generator", "gan_discriminator"} <= set(r) for r in same)
    assert all(r["loss"] != r["gan_discriminator"] and r["images_per_s"] > 0 for r in same)
    assert [("pixel" in r, "gan_discriminator" in r) for r in alternate] == [(True, False), (False, True)] * 2
    assert [r["images_per_s"] > 0 for r in alternate] == [True, False, True, False]


@pytest.mark.slow
@needs_fashion
def test_compiled_training_matches_eager(tmp_path):
    """engine.compile (the parts `compile_parts` names, GAN included) logs the eager run's losses, to round-off
    (a small learning rate keeps training from amplifying it)."""
    common = short_gan_run(3, "engine.channels_last=true", "optim.lr=1e-5", "optim.discriminator_lr=1e-5")
    assert main([*common, f"engine.output_dir={tmp_path / 'eager'}"]) == 0
    assert main([*common, f"engine.output_dir={tmp_path / 'compiled'}", "engine.compile=true"]) == 0
    eager, compiled = loss_records(tmp_path / "eager"), loss_records(tmp_path / "compiled")
    assert [sorted(r) for r in eager] == [sorted(r) for r in compiled]
    for a, b in zip(eager, compiled):
        assert all(b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6) for k in a), (a, b)


@needs_fashion
def test_activation_checkpointing_logs_the_same_losses(tmp_path):
    """engine.activation_checkpointing (the decoder's levels recomputed in the backward, GAN and its adaptive
    weight included) trains exactly as without it on the CPU."""
    common = short_gan_run(3)
    assert main([*common, f"engine.output_dir={tmp_path / 'plain'}"]) == 0
    assert main([*common, f"engine.output_dir={tmp_path / 'recomputed'}", "engine.activation_checkpointing=true"]) == 0
    plain, recomputed = loss_records(tmp_path / "plain"), loss_records(tmp_path / "recomputed")
    assert len(plain) == 3 and plain == recomputed


def test_nan_loss_stops_the_tokenizer_run(tmp_path, capsys):
    code = main(["--config", CONFIG, f"engine.output_dir={tmp_path}", "engine.max_steps=3", "optim.lr=1e30",
                 "engine.grad_clip_norm=0.0", "optim.batch_size=2", "monitor.heldout_every=0",
                 "monitor.image_every=0", "data.num_workers=0", "engine.checkpoint_every=1"])
    message = capsys.readouterr().err
    assert code == 2 and "training stopped" in message
    assert re.search(r"loss '\w+' is (nan|inf) at step [23]", message), message
    assert find_checkpoints(tmp_path)  # the last good one is kept


@pytest.mark.slow
@needs_fashion
def test_few_hundred_steps_gain_at_least_3db(tmp_path):
    assert main(["--config", CONFIG, f"engine.output_dir={tmp_path}", "engine.max_steps=300"]) == 0
    curve = heldout_curve(tmp_path)
    assert curve[300] - curve[0] >= 3.0, curve


# ---- losses ---------------------------------------------------------------------------------------------------

def test_loss_config_requires_weight_files_unless_random():
    with pytest.raises(ValueError, match="lpips_vgg16"):
        LossConfig()
    with pytest.raises(ValueError, match="inception_weights"):
        LossConfig(lpips_weight=0.0)
    with pytest.raises(ValueError, match="feature_input_range"):
        LossConfig(random_init=True, feature_input_range="0_1")
    with pytest.raises(ValueError, match="gan_schedule"):
        LossConfig(random_init=True, gan_schedule="interleaved")
    config = LossConfig(random_init=True, gan_start=10)   # same_batch: a discriminator update after every step
    assert not config.gan_active(10) and config.gan_active(11)
    assert [s for s in range(9, 16) if config.discriminator_follows(s)] == [11, 12, 13, 14, 15]
    assert not any(config.is_discriminator_step(s) for s in range(9, 16))
    released = LossConfig(random_init=True, gan_start=10, gan_schedule="alternate")
    assert [s for s in range(9, 16) if released.is_discriminator_step(s)] == [12, 14]
    assert not any(released.discriminator_follows(s) for s in range(9, 16))


def test_pixel_losses_and_hinge():
    recon, target = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    l2 = TokenizerLosses(LossConfig(lpips_weight=0, feature_weight=0, gan_weight=0))
    l1 = TokenizerLosses(LossConfig(pixel="l1", lpips_weight=0, feature_weight=0, gan_weight=0))
    assert l2.pixel_loss(recon, target).item() == pytest.approx(0.25)
    assert l1.pixel_loss(recon, target).item() == pytest.approx(0.5)
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.5 + 0.75))


def test_adaptive_weight_is_the_gradient_norm_ratio():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    reconstruction = weight * torch.tensor([3.0, 1.0])
    rec_grad, gan_grad = torch.tensor([1.0, 3.0]), torch.tensor([2 / 3, 4.0])   # at w: (3, 3) and (2, 4)
    expected = (3 * 2 ** 0.5) / (20 ** 0.5 + 1e-4)
    assert adaptive_gan_weight(reconstruction, rec_grad, gan_grad, weight).item() == pytest.approx(expected, rel=1e-6)


class SquaredFeatureLoss(torch.nn.Module):
    """A stand-in for the Inception feature loss (same interface, a few conv features), cheap in float64."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.Tanh()).double()

    def forward(self, reconstruction, target):
        with torch.no_grad():
            target_features = self.net(target)
        return (self.net(reconstruction) - target_features).square().mean()


def test_generator_loss_gradients_equal_the_plain_objective_in_float64():
    """Each loss network's single backward pass gives the plain objective's gradients: pixel + LPIPS + features
    + 0.3 * adaptive weight * GAN term, the weight from autograd.grad of each term at the last conv weight."""
    torch.manual_seed(0)
    config = LossConfig(random_init=True, gan_start=0, lpips_weight=0.7, feature_weight=0.5)
    losses = TokenizerLosses(LossConfig(**{**config.__dict__, "feature_weight": 0.0})).double()
    losses.config, losses.features = config, SquaredFeatureLoss()
    discriminator = PatchDiscriminator(layers=2, channels=16).double()
    body, last = torch.nn.Conv2d(3, 8, 3, padding=1).double(), torch.nn.Conv2d(8, 3, 3, padding=1).double()
    inputs, target = (torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1 for _ in range(2))
    parameters = [*body.parameters(), *last.parameters()]

    def reconstruct():
        return last(torch.nn.functional.silu(body(inputs)))

    loss, terms = losses.generator_loss(reconstruct(), target, step=1, discriminator=discriminator,
                                        last_layer=last.weight)
    fast_grads = torch.autograd.grad(loss, parameters)

    reconstruction = reconstruct()
    pixel = (reconstruction - target).square().mean()
    lpips = losses.lpips(reconstruction, target)
    features = losses.features(reconstruction, target)
    generator = -discriminator(reconstruction).mean()
    rec_w = torch.autograd.grad(pixel + 0.7 * lpips, last.weight, retain_graph=True)[0]
    gan_w = torch.autograd.grad(generator, last.weight, retain_graph=True)[0]
    weight = (rec_w.norm() / (gan_w.norm() + 1e-4)).clamp(0.0, 1e4).detach()
    plain = pixel + 0.7 * lpips + 0.5 * features + 0.3 * weight * generator
    plain_grads = torch.autograd.grad(plain, parameters)

    assert set(terms) == {"pixel", "lpips", "inception_features", "gan_generator", "gan_adaptive_weight"}
    assert 0.0 < terms["gan_adaptive_weight"].item() < 1e4
    torch.testing.assert_close(terms["gan_adaptive_weight"], weight, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss.detach(), plain.detach(), rtol=1e-12, atol=0)
    for fast, reference in zip(fast_grads, plain_grads):
        torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in discriminator.parameters())


def test_generator_loss_with_all_terms_is_differentiable():
    config = LossConfig(random_init=True, feature_weight=0.0, gan_start=0)
    losses = TokenizerLosses(config)
    assert isinstance(losses.lpips, LPIPSLoss)
    decoder = torch.nn.Conv2d(3, 3, 3, padding=1)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = decoder(target)
    discriminator = PatchDiscriminator(layers=2, channels=16)
    total, terms = losses.generator_loss(recon, target, step=1, discriminator=discriminator,
                                         last_layer=decoder.weight)
    assert set(terms) == {"pixel", "lpips", "gan_generator", "gan_adaptive_weight"}
    total.backward()
    assert decoder.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in discriminator.parameters())  # the generator step leaves D alone
    d_loss, d_terms = losses.discriminator_loss(discriminator, recon, target)
    d_loss.backward()
    assert all(p.grad is not None for p in discriminator.parameters())


@pytest.mark.slow
def test_inception_feature_loss_scaling():
    from tokenizer.losses import InceptionFeatureLoss

    torch.manual_seed(0)
    loss = InceptionFeatureLoss(random_init=True)
    released = InceptionFeatureLoss(random_init=True, input_range="0_510")
    released.network.load_state_dict(loss.network.state_dict())
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    assert loss.scale == 127.5 and released.scale == 255.0
    assert not torch.allclose(loss.features(images), released.features(images))
    recon = images.clone().requires_grad_(True)
    value = loss(recon + 0.1, images)
    value.backward()
    assert value.item() > 0 and recon.grad.abs().sum() > 0

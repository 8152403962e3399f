"""Train a GPSToken tokenizer.

    accelerate launch tokenizer/train.py --config configs/train_gpstoken_m128.yaml [key.sub=value ...]
    python tokenizer/train.py --config configs/train_tiny_fashion.yaml engine.max_steps=300 --resume auto

A run config (`configs/train_*.yaml`) names the model config (`model: gpstoken_m128`) and holds the data,
losses, optimiser and engine settings; the resolved config is saved as `<output_dir>/config.yaml`. The step
loop: a tokenizer update (Adam, EMA update) and, once the GAN is on, a discriminator update on the same
batch's reconstruction (`losses.gan_schedule: same_batch`) or on a batch of its own in alternate steps (as
released; see `tokenizer.losses`); everything else (processes, checkpoints, logs, NaN stop, speed switches)
is `tokenizer.engine`'s. `images_per_s` in the logs counts the images the tokenizer was trained on.
Outputs: checkpoints, `metrics.jsonl`, TensorBoard, reconstruction grids with token overlays under
`images/`, and at the end `ema.safetensors` (EMA weights, released key layout, for `tokenizer.official`).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from tokenizer.config import load_config
from tokenizer.data import DataConfig, PartitionSettings, build_dataset, partition_batch
from tokenizer.engine import EngineConfig, NonFiniteLossError, TrainingEngine, load_run_config
from tokenizer.images import to_uint8
from tokenizer.losses import LossConfig, PatchDiscriminator, TokenizerLosses
from tokenizer.model import GPSToken

logger = logging.getLogger("gpstoken.train")

EMA_FILE = "ema.safetensors"


@dataclass
class OptimConfig:
    lr: float = 5e-5
    betas: tuple[float, float] = (0.5, 0.9)   # the release's Adam betas, for tokenizer and discriminator
    discriminator_lr: float = 5e-5
    batch_size: int = 16                      # per process and micro-batch


@dataclass
class MonitorConfig:
    image_every: int = 5000                   # reconstruction grid with token overlays (0 = never)
    image_count: int = 4
    heldout_every: int = 0                    # PSNR of a fixed held-out batch (0 = never)
    heldout_images: int = 64
    heldout: DataConfig | None = None         # the held-out source (crop centre, no flip)


@dataclass
class TokenizerTrainConfig:
    model: str = "gpstoken_m128"              # model config: shipped name or YAML path
    data: DataConfig = field(default_factory=DataConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


def load_batch(batch: dict[str, torch.Tensor], partition: PartitionSettings, device: torch.device,
               on_device: bool = False):
    """A loader batch -> (images in [-1, 1], init geometry, boxes) on `device`, copied without a host sync;
    partitions the batch here when the loader did not (`on_device`: with the PyTorch partition on `device`)."""
    if "init_geometry" not in batch:
        batch["init_geometry"], batch["boxes"] = partition_batch(batch["pixels"], partition,
                                                                 device if on_device else None)
    pixels = batch["pixels"].to(device, non_blocking=True)
    images = (pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()
    return (images, batch["init_geometry"].to(device, non_blocking=True),
            batch["boxes"].to(device, non_blocking=True))


def compile_parts(engine: TrainingEngine, model: GPSToken, losses: TokenizerLosses,
                  discriminator: torch.nn.Module | None) -> None:
    """With `engine.compile`, compile in place: the encoder's stem and each of its blocks (one compilation
    serves all blocks), the decoder up to its last conv, the discriminator and the loss networks. The decoder's
    last conv stays eager because the adaptive GAN weight takes gradients at its weight: through a compiled
    region that would run the region's whole backward pass twice more per step."""
    decoder = model.decoder
    parts = [model.encoder.stem, *model.encoder.blocks, decoder.mid, *decoder.up, decoder.norm_out,
             losses.lpips, losses.features, discriminator]
    for part in parts:
        if part is not None:
            engine.compile_module(part)


@torch.no_grad()
def heldout_psnr(model: GPSToken, batch: tuple[torch.Tensor, ...]) -> float:
    """Mean PSNR (dB, uint8 RGB) of the model's reconstructions of a fixed batch."""
    from eval.metrics import psnr

    images, geometry, boxes = batch
    was_training = model.training
    model.eval()
    reconstruction, _ = model(images, geometry, boxes)
    model.train(was_training)
    return float(np.mean(psnr(to_uint8(reconstruction), to_uint8(images))))


@torch.no_grad()
def reconstruction_grid(model: GPSToken, batch: tuple[torch.Tensor, ...], count: int) -> np.ndarray:
    """Rows of (input with initial partition, input with refined tokens, reconstruction)."""
    from tokenizer.viz import draw_tokens, image_grid

    images, geometry, boxes = (t[:count] for t in batch)
    reconstruction, tokens = model(images, geometry, boxes)
    inputs, outputs = to_uint8(images), to_uint8(reconstruction)
    scale = max(1, 256 // images.shape[-1])
    rows = [[draw_tokens(inputs[i], geometry[i].cpu().numpy(), scale=scale),
             draw_tokens(inputs[i], tokens[i, :, :5].float().cpu().numpy(), scale=scale),
             np.kron(outputs[i], np.ones((scale, scale, 1), dtype=np.uint8))] for i in range(len(inputs))]
    return image_grid(rows)


def train(config: TokenizerTrainConfig, resolved: dict[str, Any], resume: str | None = None) -> Path:
    """Run (or continue) the training described by `config`; returns the exported EMA weights' path."""
    engine = TrainingEngine(config.engine, run_config=resolved)
    try:
        model_config = load_config(config.model)
        if model_config.tile_size != config.data.image_size:
            raise ValueError(f"data.image_size {config.data.image_size} differs from the tile size "
                             f"{model_config.tile_size} of model '{config.model}'")
        partition = PartitionSettings(model_config.num_tokens, model_config.partition_min_size,
                                      model_config.partition_weight)
        model = GPSToken(model_config)
        model.decoder.checkpoint_levels = config.engine.activation_checkpointing
        engine.to_memory_format(model.decoder)
        losses = engine.to_memory_format(TokenizerLosses(config.losses)).to(engine.device)
        fused = engine.device.type == "cuda"   # one fused Adam kernel per step; the CPU keeps the default path
        optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr, betas=config.optim.betas, fused=fused)
        if config.losses.gan_weight > 0:
            discriminator = engine.to_memory_format(
                PatchDiscriminator(config.losses.disc_layers, config.losses.disc_channels))
            disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=config.optim.discriminator_lr,
                                              betas=config.optim.betas, fused=fused)
            model, optimizer, discriminator, disc_optimizer = engine.prepare(
                model, optimizer, discriminator, disc_optimizer, compile_models=False)
        else:
            model, optimizer = engine.prepare(model, optimizer, compile_models=False)
            discriminator = disc_optimizer = None
        frozen_discriminator = engine.unwrap(discriminator) if discriminator is not None else None
        compile_parts(engine, engine.unwrap(model), losses, frozen_discriminator)
        engine.track_ema(model)
        start = engine.resume(resume)
        logger.info("model %s: %.1f M parameters; data: %s", config.model,
                    engine.unwrap(model).num_parameters() / 1e6, config.data.source)

        dataset = build_dataset(config.data, partition)
        on_device = config.data.partition == "gpu"
        batches = engine.batches(dataset, config.optim.batch_size, config.data.num_workers, start_step=start)
        heldout = None
        if config.monitor.heldout_every and engine.is_main_process:
            source = config.monitor.heldout or dataclasses.replace(config.data, crop="center", hflip=False)
            heldout_set = build_dataset(source, partition)
            count = min(config.monitor.heldout_images, len(heldout_set))
            samples = torch.utils.data.default_collate([heldout_set[(i, i)] for i in range(count)])
            heldout = load_batch(samples, partition, engine.device, on_device)
        last_layer = engine.unwrap(model).decoder.conv_out.weight
        skipped_files = 0
        recent: tuple[torch.Tensor, ...] | None = None   # the latest training batch, for image grids
        fakes: list[tuple[torch.Tensor, torch.Tensor]] = []   # (real, detached reconstruction) per micro-batch

        def tokenizer_loss(step: int):
            def compute(batch):
                nonlocal skipped_files, recent
                skipped_files += int(batch["skipped"].sum())
                recent = load_batch(batch, partition, engine.device, on_device)
                # validate=False: no host syncs; non-finite tokens (diverged weights, which the renderer skips)
                # reach the NaN guard through this sum instead
                reconstruction, tokens = model(*recent, validate=False)
                engine.check_finite(step, {"tokens": tokens.detach().float().sum()})
                target = recent[0].contiguous(memory_format=engine.memory_format)
                if config.losses.discriminator_follows(step):
                    fakes.append((target, reconstruction.detach()))
                return losses.generator_loss(reconstruction, target, step, frozen_discriminator, last_layer)
            return compute

        def discriminator_loss(fake: tuple[torch.Tensor, torch.Tensor]):   # same_batch schedule
            target, reconstruction = fake
            return losses.discriminator_loss(discriminator, reconstruction, target)

        def separate_discriminator_loss(batch):   # alternate schedule: a batch of its own, as released
            nonlocal skipped_files
            skipped_files += int(batch["skipped"].sum())
            images, geometry, boxes = load_batch(batch, partition, engine.device, on_device)
            with torch.no_grad():
                reconstruction, _ = model(images, geometry, boxes, validate=False)
            return losses.discriminator_loss(discriminator, reconstruction,
                                             images.contiguous(memory_format=engine.memory_format))

        def monitors_due(step: int) -> bool:
            last = step == config.engine.max_steps
            return bool((config.monitor.heldout_every and (step % config.monitor.heldout_every == 0 or last))
                        or (config.monitor.image_every and step % config.monitor.image_every == 0))

        if heldout is not None and start == 0:
            engine.log_scalars(0, {"heldout_psnr": heldout_psnr(engine.unwrap(model), heldout)})
        images_per_step = config.optim.batch_size * config.engine.grad_accum_steps
        for step in engine.steps(start):
            if config.losses.is_discriminator_step(step):
                metrics = engine.optimizer_step(step, discriminator, disc_optimizer, separate_discriminator_loss,
                                                batches)
                trained_images = 0   # the tokenizer trains on no image in this step
            else:
                metrics = engine.optimizer_step(step, model, optimizer, tokenizer_loss(step), batches)
                engine.update_ema()
                trained_images = images_per_step
                if config.losses.discriminator_follows(step):
                    disc_metrics = engine.optimizer_step(step, discriminator, disc_optimizer, discriminator_loss,
                                                         iter(fakes))
                    fakes.clear()
                    disc_metrics.pop("loss")   # = gan_discriminator; "loss" stays the tokenizer's
                    if "grad_norm" in disc_metrics:
                        disc_metrics["discriminator_grad_norm"] = disc_metrics.pop("grad_norm")
                    metrics.update(disc_metrics)
            metrics["skipped_files"] = float(skipped_files)
            if monitors_due(step):
                engine.verify_finite()   # the monitors check the model's inputs, which a NaN would trip first
            if heldout is not None and (step % config.monitor.heldout_every == 0 or step == config.engine.max_steps):
                engine.log_scalars(step, {"heldout_psnr": heldout_psnr(engine.unwrap(model), heldout)})
            if engine.is_main_process and config.monitor.image_every and step % config.monitor.image_every == 0:
                grid = reconstruction_grid(engine.unwrap(model), heldout or recent, config.monitor.image_count)
                engine.log_image(step, "reconstruction", grid)
            engine.end_step(step, metrics, images=trained_images)
        if skipped_files:
            logger.warning("%d unreadable file(s) were skipped in this run (see the warnings above)", skipped_files)
        return engine.export_ema(engine.output_dir / EMA_FILE)
    finally:
        engine.finish()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML (configs/train_*.yaml)")
    parser.add_argument("--resume", default=None,
                        help="'auto' = newest checkpoint of the output folder (or a fresh start); or a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. engine.max_steps=100")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config, resolved = load_run_config(TokenizerTrainConfig, args.config, args.overrides)
    try:
        train(config, resolved, args.resume)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

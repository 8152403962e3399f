"""Flow-matching training of the generator stages (texture, layout, one-stage) on extracted token shards.

One trainer serves the three stages; `generator.spaces` holds what differs (what the flow runs on). All the
machinery (accelerate, bf16 autocast, gradient clipping, EMA, checkpoints with keep-last-K and exact resume,
JSONL/TensorBoard logs, progress with images/s, NaN guard, `torch.compile`) is `tokenizer.engine`'s.

The loss of one batch (SPEC.md section 7): tokens -> flow data x1 (and the layout condition), noise x0, time t
(uniform as released, or logit-normal), x_t = t x1 + (1 - t) x0, the model predicts x1 - x0, mean squared error.
Labels are dropped to the null class with probability `model.class_dropout_prob` (in the model), and the layout
condition of the texture model gets Gaussian noise of std `flow.layout_noise_std` (0.5 in the paper) during
training only, so that the texture model tolerates the imperfect layouts of stage 1.

A run directory holds, besides the engine's checkpoints and logs: `config.yaml` (the resolved run config),
`flow_space.json` (the statistics the flow was trained with: sampling needs no shards) and, at the end,
`ema.safetensors` (the EMA weights, what `load_trained` and the sampler read).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenizer.engine import EngineConfig, NonFiniteLossError, TrainingEngine, build_config

from .config import ModelConfig, SamplerConfig
from .flow import M128_TOKEN_STATS, TIMESTEP_SAMPLINGS, interpolate, sample_timesteps, velocity_loss, velocity_target
from .models import FlowTransformer, build_model
from .shards import TokenShardDataset, TokenShards
from .spaces import STAGES, JointSpace, LayoutSpace, TextureSpace, space_from_dict, space_to_dict

logger = logging.getLogger("gpstoken.train")

__all__ = ["DataConfig", "OptimizerConfig", "FlowConfig", "PreviewConfig", "GeneratorRunConfig",
           "build_space", "flow_loss", "heldout_loss", "seed_noise", "train", "load_trained", "NonFiniteLossError"]

SPACE_FILE = "flow_space.json"
EMA_FILE = "ema.safetensors"
STATISTICS = ("shards", "m128")


@dataclass
class DataConfig:
    shards: str = ""                 # directory written by generator/extract_tokens.py
    batch_size: int = 256            # per process and micro-batch
    num_workers: int = 8
    random_flip: bool = True         # draw one of the stored variants (original / mirrored) per sample


@dataclass
class OptimizerConfig:
    name: str = "adamw"              # "adamw" or "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0            # linear learning-rate warm-up

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "adam"):
            raise ValueError(f"optimizer.name must be 'adamw' or 'adam', got {self.name!r}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"optimizer: need lr > 0 and warmup_steps >= 0, got {self.lr}, {self.warmup_steps}")


@dataclass
class FlowConfig:
    timesteps: str = "uniform"       # "uniform" (released) or "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    layout_noise_std: float = 0.5    # Gaussian noise on the texture model's layout condition (training only)

    def __post_init__(self) -> None:
        if self.timesteps not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"flow.timesteps must be one of {TIMESTEP_SAMPLINGS}, got {self.timesteps!r}")
        if self.layout_noise_std < 0 or self.logit_std <= 0:
            raise ValueError("flow: layout_noise_std must be >= 0 and logit_std > 0")


@dataclass
class PreviewConfig:
    """A grid of samples from the EMA model every `every` steps (0: never), decoded to pixels."""

    every: int = 0
    num_images: int = 16
    tokenizer: str = ""              # tokenizer config name or YAML (texture / one-stage previews)
    tokenizer_weights: str = ""      # its weights (EMA safetensors or a released checkpoint)
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(method="euler", num_steps=50))
    seed: int = 0


@dataclass
class GeneratorRunConfig:
    stage: str = "texture"           # "texture", "layout" or "one_stage" (see generator.spaces)
    statistics: str = "shards"       # normalisation: the shards' stats.json, or "m128" (the released numbers)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.statistics not in STATISTICS:
            raise ValueError(f"statistics must be one of {STATISTICS}, got {self.statistics!r}")
        has_layout = self.model.layout_channels is not None
        if has_layout != (self.stage == "texture"):
            raise ValueError(f"stage {self.stage!r}: model.layout_channels must be "
                             f"{'5' if self.stage == 'texture' else 'null'}")
        if self.stage == "layout" and self.model.in_channels != 5:
            raise ValueError(f"stage 'layout': model.in_channels must be 5, got {self.model.in_channels}")


def build_space(config: GeneratorRunConfig, shards: TokenShards) -> TextureSpace | LayoutSpace | JointSpace:
    """The flow space of the run's stage with its statistics; checks the shards fit the model."""
    plan, model = shards.plan, config.model
    if plan.num_classes > model.num_classes:
        raise ValueError(f"{shards.directory} holds labels of {plan.num_classes} classes, the model has "
                         f"model.num_classes = {model.num_classes}")
    if model.pos_embed and plan.num_tokens != model.num_tokens:
        raise ValueError(f"{shards.directory} holds {plan.num_tokens} tokens per image, the model's positional "
                         f"embedding has model.num_tokens = {model.num_tokens}")
    stats = shards.stats()
    token_stats = M128_TOKEN_STATS if config.statistics == "m128" else stats.tokens
    if config.stage != "layout" and len(token_stats.mean) != plan.token_dim:
        raise ValueError(f"statistics {config.statistics!r} have {len(token_stats.mean)} channels, the shards' "
                         f"tokens {plan.token_dim}")
    space = {"texture": lambda: TextureSpace(token_stats),
             "layout": lambda: LayoutSpace(stats.layout_mean, stats.layout_std),
             "one_stage": lambda: JointSpace(token_stats, stats.layout_mean, stats.layout_std)}[config.stage]()
    if space.channels != model.in_channels:
        raise ValueError(f"stage {config.stage!r} on these shards has {space.channels} channels, the model "
                         f"model.in_channels = {model.in_channels}")
    return space


def _flow_inputs(space, batch: dict[str, torch.Tensor], device: torch.device, layout_noise_std: float,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x_data, condition = space.to_flow(batch["tokens"].to(device), batch["layout"].to(device))
    kwargs = {"y": batch["label"].to(device)}
    if condition is not None:
        if layout_noise_std > 0:
            noise = torch.randn(condition.shape, device=device, generator=generator)
            condition = condition + layout_noise_std * noise
        kwargs["layout"] = condition
    return x_data, kwargs


def flow_loss(model: torch.nn.Module, space, batch: dict[str, torch.Tensor], flow: FlowConfig,
              device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one batch of shard items: (mean loss, {"loss": ...})."""
    x_data, kwargs = _flow_inputs(space, batch, device, flow.layout_noise_std)
    loss = velocity_loss(model, x_data, timesteps=flow.timesteps, logit_mean=flow.logit_mean,
                         logit_std=flow.logit_std, **kwargs).mean()
    return loss, {"loss": loss}


@torch.no_grad()
def heldout_loss(model: FlowTransformer, space, batch: dict[str, torch.Tensor], seed: int = 0,
                 repeats: int = 4) -> float:
    """Velocity loss on held-out items with fixed noise and times (uniform, `repeats` draws per item), labels
    kept and no layout noise: comparable between checkpoints."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x_data, kwargs = _flow_inputs(space, batch, device, 0.0)
    total = 0.0
    for _ in range(repeats):
        noise = torch.randn(x_data.shape, generator=generator).to(device)
        t = sample_timesteps(x_data.shape[0], "uniform", generator=generator).to(device)
        prediction = model(interpolate(x_data, noise, t), t, **kwargs)
        total += float(((prediction.float() - velocity_target(x_data, noise)) ** 2).mean())
    model.train(was_training)
    return total / repeats


def seed_noise(seed: int, process_index: int) -> None:
    """Seed this process's torch generators (flow noise and times, label dropout, layout noise) with a stream of
    its own. The engine seeds every process alike, which makes the models start identical; left so, the processes
    of a multi-GPU run would draw the same noise and times for their different samples."""
    torch.manual_seed(int(np.random.SeedSequence([seed, process_index]).generate_state(1, np.uint64)[0]))


def _build_optimizer(model: torch.nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    kind = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    fused = {"fused": True} if torch.cuda.is_available() else {}
    return kind(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, **fused)


def _set_learning_rate(optimizer: torch.optim.Optimizer, config: OptimizerConfig, step: int) -> None:
    scale = min(1.0, step / config.warmup_steps) if config.warmup_steps else 1.0
    for group in optimizer.param_groups:
        group["lr"] = config.lr * scale


def train(config: GeneratorRunConfig, raw_config: dict[str, Any] | None = None, resume: str | None = None) -> Path:
    """Train one stage; returns the path of the exported EMA weights. Raises `NonFiniteLossError` (with the step
    and the last intact checkpoint) when the loss turns NaN/inf; the checkpoints on disk are left as they were."""
    shards = TokenShards(config.data.shards)
    space = build_space(config, shards)
    engine = TrainingEngine(config.engine, run_config=raw_config)
    if engine.is_main_process:
        (engine.output_dir / SPACE_FILE).write_text(json.dumps(space_to_dict(space), indent=1))
    model = build_model(config.model)
    model.check_inputs = False  # labels, shapes and finiteness are checked once, on the shards (build_space)
    model.checkpoint_blocks = config.engine.activation_checkpointing
    if engine.is_main_process:
        logger.info("%s model: %.1f M parameters", config.stage, sum(p.numel() for p in model.parameters()) / 1e6)
    optimizer = _build_optimizer(model, config.optimizer)
    model, optimizer = engine.prepare(model, optimizer)
    engine.track_ema(model)
    seed_noise(config.engine.seed, engine.accelerator.process_index)
    start = engine.resume(resume)  # a checkpoint brings back every process's random state
    dataset = TokenShardDataset(shards, random_variant=config.data.random_flip)
    batches = engine.batches(dataset, config.data.batch_size, config.data.num_workers, start_step=start)
    preview = None
    if config.preview.every > 0:
        from .preview import Preview

        preview = Preview(config.preview, space, shards, engine.device)
    images_per_step = config.data.batch_size * config.engine.grad_accum_steps

    def loss_fn(batch: dict[str, torch.Tensor]):
        return flow_loss(model, space, batch, config.flow, engine.device)

    model.train()
    try:
        for step in engine.steps(start):
            _set_learning_rate(optimizer, config.optimizer, step)
            metrics = engine.optimizer_step(step, model, optimizer, loss_fn, batches)
            engine.update_ema()
            engine.end_step(step, {**metrics, "lr": optimizer.param_groups[0]["lr"]}, images=images_per_step)
            if preview is not None and (step % config.preview.every == 0 or step == config.engine.max_steps):
                preview.write(engine, engine.unwrap(model), step)
    except NonFiniteLossError:
        engine.finish()
        raise
    path = engine.export_ema(engine.output_dir / EMA_FILE)
    engine.finish()
    return path


def load_run_directory_config(run_dir: str | Path) -> GeneratorRunConfig:
    """The resolved `config.yaml` of a training run."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a generator training run directory)")
    return build_config(GeneratorRunConfig, yaml.safe_load(path.read_text()), str(path))


def load_trained(run_dir: str | Path, weights: str | Path | None = None,
                 device: str | torch.device = "cpu") -> tuple[FlowTransformer, Any, GeneratorRunConfig]:
    """(eval-mode model with the EMA weights, its flow space, its run config) of a finished training run."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    config = load_run_directory_config(run_dir)
    space_path = run_dir / SPACE_FILE
    if not space_path.is_file():
        raise FileNotFoundError(f"{space_path}: missing (not a generator training run directory)")
    space = space_from_dict(json.loads(space_path.read_text()), str(space_path))
    weights = Path(weights) if weights else run_dir / EMA_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (the run has not finished; export the EMA weights first)")
    model = build_model(config.model)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(device).eval(), space, config



def run_cli(argv: list[str] | None, stages: tuple[str, ...], description: str) -> int:
    """Command line of the trainers: `--config FILE [--resume auto|PATH] [key.sub=value ...]`."""
    import argparse
    import sys

    from tokenizer.engine import load_run_config

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="run config YAML (configs/dit_*.yaml, configs/layout_*.yaml)")
    parser.add_argument("--resume", default=None,
                        help="'auto': continue from the newest checkpoint of the output folder; or a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. engine.max_steps=100")
    args = parser.parse_args(argv)
    config, raw = load_run_config(GeneratorRunConfig, args.config, args.overrides)
    if config.stage not in stages:
        parser.error(f"{args.config} trains stage {config.stage!r}; this script trains {' or '.join(stages)}")
    try:
        path = train(config, raw, args.resume)
    except NonFiniteLossError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 3
    print(f"EMA weights: {path}")
    return 0

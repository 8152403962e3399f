"""Typed configuration of the generators (texture model, layout model) and of their samplers.

A generator YAML file (`configs/sit_*.yaml`) holds a `model` mapping (`ModelConfig`), an optional `sampler`
mapping (`SamplerConfig`) and a `name`. Loading is strict: an unknown key or a value of the wrong type is an
error naming it, so a typo never falls back to a default silently.

One backbone serves both stages; the config decides which one it is:
- texture model: `layout_channels = 5` (the init geometry of each token is the condition), no positional
  embedding, `in_channels = 5 + C` normalised token channels (21 for M128);
- layout model: `layout_channels = None`, `in_channels = 5` (the geometry itself), an optional learned
  positional embedding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tokenizer.yaml_config import NamedYamlConfig

# depth, width, heads of the SiT/DiT model sizes (patch size 1 over tokens).
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

SAMPLING_METHODS = ("sde", "euler", "heun")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of one flow transformer over a set of tokens (DiT/SiT with patch size 1)."""

    num_tokens: int = 128               # tokens per sample (released `latent_size`)
    in_channels: int = 21               # numbers per token the flow runs on
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000             # label `num_classes` is the null (unconditional) class
    class_dropout_prob: float = 0.1     # training-time label dropout for classifier-free guidance
    learn_sigma: bool = True            # the output layer is 2x wide; the second half is discarded (release)
    layout_channels: Optional[int] = 5  # per-token condition width (texture model); None: no condition
    pos_embed: bool = False             # a learned positional embedding (layout model option)
    qk_norm: bool = False               # LayerNorm on queries and keys (stability of new trainings)
    frequency_embedding_size: int = 256

    def __post_init__(self) -> None:
        for key in ("num_tokens", "in_channels", "hidden_size", "depth", "num_heads", "num_classes",
                    "frequency_embedding_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"model config: {key} must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model config: hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.layout_channels is not None and self.layout_channels < 1:
            raise ValueError(f"model config: layout_channels must be >= 1 or null, got {self.layout_channels}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"model config: class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model config: mlp_ratio must be > 0, got {self.mlp_ratio}")

    @classmethod
    def sized(cls, size: str, **overrides: Any) -> "ModelConfig":
        """A config of a named size (`S`, `B`, `L`, `XL`) with any other field overridden."""
        if size not in MODEL_SIZES:
            raise ValueError(f"unknown model size '{size}'; known sizes: {sorted(MODEL_SIZES)}")
        depth, width, heads = MODEL_SIZES[size]
        return cls(**{"depth": depth, "hidden_size": width, "num_heads": heads, **overrides})


@dataclass(frozen=True)
class SamplerConfig:
    """How samples are drawn; the defaults are the released setting (SDE, 250 steps, CFG 1.5 for t >= 0.2)."""

    method: str = "sde"                 # "sde" (Euler-Maruyama), "euler" or "heun" (ODE)
    num_steps: int = 250                # SDE: network evaluations incl. the final mean step; ODE: steps
    guidance_scale: float = 1.5         # 1.0 disables classifier-free guidance
    guidance_low: float = 0.2           # guidance only for guidance_low <= t <= guidance_high
    guidance_high: float = 1.0
    sde_t0: float = 1e-3                # first SDE time (the diffusion (1-t)/t is infinite at 0)
    last_step_size: float = 0.04        # the SDE integrates to 1 - last_step_size, then one mean step
    diffusion_norm: float = 1.0         # scale of the SBDM diffusion (1-t)/t

    def __post_init__(self) -> None:
        if self.method not in SAMPLING_METHODS:
            raise ValueError(f"sampler config: method must be one of {SAMPLING_METHODS}, got '{self.method}'")
        if self.num_steps < (2 if self.method == "sde" else 1):
            raise ValueError(f"sampler config: num_steps too small for '{self.method}': {self.num_steps}")
        if not 0.0 <= self.guidance_low <= self.guidance_high <= 1.0:
            raise ValueError(f"sampler config: need 0 <= guidance_low <= guidance_high <= 1, got "
                             f"[{self.guidance_low}, {self.guidance_high}]")
        if not 0.0 < self.sde_t0 < 1.0 - self.last_step_size <= 1.0:
            raise ValueError(f"sampler config: need 0 < sde_t0 < 1 - last_step_size, got sde_t0={self.sde_t0}, "
                             f"last_step_size={self.last_step_size}")


@dataclass(frozen=True)
class GeneratorConfig(NamedYamlConfig):
    """A generator file: the network sizes and the default sampler."""

    name: str = "sit"
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


def load_generator_config(name_or_path: str | Path) -> GeneratorConfig:
    """A shipped generator config by name (`sit_xl`, `sit_tiny`, ...) or any YAML file path."""
    from configs import config_path

    return GeneratorConfig.from_yaml(config_path(str(name_or_path)))

"""Two-stage class-conditional generation over GPS-tokens: a layout model generates the init geometry, a
SiT-style texture model generates the tokens given that layout (see docs/DESIGN.md)."""
from .config import GeneratorConfig, ModelConfig, SamplerConfig, load_generator_config
from .flow import M128_TOKEN_STATS, TokenStats, normalize_tokens, postprocess_tokens, velocity_loss
from .layouts import InitgLayouts, LayoutSource
from .models import FlowTransformer, LayoutModel, TextureModel, build_model
from .official import load_released_generator
from .samplers import Guidance, GuidedVelocity, RowNoise, generate, sample_seeds

__all__ = [
    "GeneratorConfig", "ModelConfig", "SamplerConfig", "load_generator_config",
    "M128_TOKEN_STATS", "TokenStats", "normalize_tokens", "postprocess_tokens", "velocity_loss",
    "InitgLayouts", "LayoutSource",
    "FlowTransformer", "LayoutModel", "TextureModel", "build_model",
    "load_released_generator",
    "Guidance", "GuidedVelocity", "RowNoise", "generate", "sample_seeds",
]

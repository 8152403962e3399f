"""Typed configuration of a GPSToken tokenizer, read from and written to YAML.

A config file has the token-level fields of `GPSTokenConfig` plus one mapping each for `encoder` and
`decoder`; training settings live in the trainer's own configs (`tokenizer.train`). Loading is strict: an
unknown key or a value of the wrong type is an error that names it, so a typo never silently falls back
to a default.

The released configs (`configs/gpstoken_{s64,m128,l256}.yaml`) differ only in the number of tokens per tile
and the texture width; everything else is shared (SPEC.md section 6).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .yaml_config import NamedYamlConfig

GEOMETRY_DIM = 5  # sigma_x, sigma_y, rho, mu_x, mu_y


@dataclass(frozen=True)
class EncoderConfig:
    """The refinement transformer: a convolutional stem, RoIAlign samples per token, `depth` blocks."""

    width: int = 512          # token width (released `gpsenc_c`)
    depth: int = 30           # transformer blocks (released `gpsenc_n`)
    heads: int = 8
    mlp_ratio: int = 4
    roi_size: int = 8         # RoIAlign output is roi_size x roi_size samples per token (released `rois`)
    stem_channels: int = 128  # width of the full-resolution stem; fixed at 128 in the released code


@dataclass(frozen=True)
class DecoderConfig:
    """The convolutional decoder from the rendered map to pixels (taming/LDM layout, no down path)."""

    channels: int = 128                            # base width (released `ch`)
    channel_mult: tuple[int, ...] = (1, 2, 4)     # per level, highest resolution first (released `ch_mult`)
    blocks_per_level: int = 2                      # each level runs this many + 1 resblocks (`num_res_blocks`)
    out_channels: int = 3


@dataclass(frozen=True)
class GPSTokenConfig(NamedYamlConfig):
    """A whole tokenizer: token format, partition defaults, encoder and decoder."""

    name: str = "gpstoken"
    num_tokens: int = 128          # tokens per tile produced by the partition by default (`gps_num`)
    texture_channels: int = 16     # C of each token (`gps_c`; also the decoder's z_channels)
    render_size: int = 64          # side of the rendered map of one tile (`gps_rs`)
    dmax: float = 3.0              # splatting cut-off in sigmas (`gps_dmax`)
    partition_weight: float = 2.5  # entropy exponent of the partition score (`gps_adaptive_w`)
    partition_min_size: int = 8    # regions at most this size + 1 on both sides are not split
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        positive = {
            "num_tokens": self.num_tokens, "texture_channels": self.texture_channels,
            "render_size": self.render_size, "encoder.width": self.encoder.width,
            "encoder.depth": self.encoder.depth, "encoder.heads": self.encoder.heads,
            "encoder.roi_size": self.encoder.roi_size, "decoder.channels": self.decoder.channels,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"config '{self.name}': {key} must be >= 1, got {value}")
        if self.encoder.width % self.encoder.heads:
            raise ValueError(f"config '{self.name}': encoder.width {self.encoder.width} is not divisible by "
                             f"encoder.heads {self.encoder.heads}")
        widths = [self.encoder.stem_channels] + [self.decoder.channels * m for m in self.decoder.channel_mult]
        if not self.decoder.channel_mult or any(w % 32 for w in widths):
            raise ValueError(f"config '{self.name}': every GroupNorm width must be a multiple of 32 groups, got "
                             f"stem {self.encoder.stem_channels} and decoder widths {widths[1:]}")

    @property
    def token_dim(self) -> int:
        """Numbers per token: 5 geometry + C texture."""
        return GEOMETRY_DIM + self.texture_channels

    @property
    def tile_size(self) -> int:
        """Pixel side of one tile: the render size times the decoder's total upsampling."""
        return self.render_size * 2 ** (len(self.decoder.channel_mult) - 1)


def load_config(name_or_path: str | Path) -> GPSTokenConfig:
    """A shipped config by name (`gpstoken_m128`) or any YAML file path."""
    from configs import config_path

    return GPSTokenConfig.from_yaml(config_path(str(name_or_path)))

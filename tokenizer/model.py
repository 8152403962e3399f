"""GPSToken: Gaussian parameterized spatially-adaptive tokenization (NeurIPS 2025), as a PyTorch model.

An image tile is described by N tokens, each a 2D Gaussian (sigma_x, sigma_y, rho, mu_x, mu_y) in normalised
tile coordinates plus a texture vector of C numbers. The method, in the order of this file:

1. Token geometry: an entropy-driven partition (`tokenizer.partition`) gives every token an initial
   Gaussian and a box; the encoder predicts a residual update of that geometry in logit space.
2. Convolutional blocks shared by the encoder stem and the decoder.
3. Encoder: a convolutional stem, RoIAlign samples of each token's box, and a transformer that refines
   one query per token, conditioned on its initial geometry and its RoI samples.
4. Decoder: the tokens are splatted into a feature map (`splat_cuda.render`), which a taming/LDM-style
   convolutional decoder turns into pixels. For images of several tiles the resblock norms use per-tile
   statistics, upsampled bicubically to the whole map, and the middle attention runs per tile.
5. GPSToken: encode, decode, and the whole-image conveniences (partition + tiles + merge).

State-dict names follow the released code for the decoder; the encoder's names are mapped from the released
ones by the single table in `tokenizer.official`. Numbers and shapes are SPEC.md sections 4-6.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torchvision.ops import roi_align

import splat_cuda

from .config import GEOMETRY_DIM, DecoderConfig, EncoderConfig, GPSTokenConfig, load_config
from .tiles import join_tiles, merge_tile_tokens, split_tiles

# --------------------------------------------------------------------------------------------------------------
# 1. Token geometry
# --------------------------------------------------------------------------------------------------------------


def refine_geometry(init_geometry: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Residual geometry update in logit space, so a zero update returns the initial geometry.

    sigma in (0, 1):            sigma = sigmoid(logit(sigma_0) + d)
    rho, mu_x, mu_y in (-1, 1): v = 2 sigmoid(logit((v_0 + 1) / 2) + d) - 1
    """
    sigma = torch.sigmoid(torch.logit(init_geometry[..., 0:2]) + delta[..., 0:2])
    rho_mu = 2 * torch.sigmoid(torch.logit((init_geometry[..., 2:5] + 1) / 2) + delta[..., 2:5]) - 1
    return torch.cat([sigma, rho_mu], dim=-1)


def _fail_where(bad: torch.Tensor, what: str, values: torch.Tensor) -> None:
    """Raise naming the first (batch, token) entry flagged in `bad` (B, N)."""
    if bool(bad.any()):
        b, n = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{what} (first at batch {b}, token {n}: {values[b, n].tolist()})")


def check_geometry(geometry: torch.Tensor, name: str, *, strict_unit: bool) -> None:
    """Validate (B, N, >=5) geometry: finite, sigma > 0, |rho| < 1; with `strict_unit` also sigma < 1, |mu| < 1."""
    geo = geometry[..., :GEOMETRY_DIM].detach()
    _fail_where(~torch.isfinite(geometry.detach()).all(-1), f"{name} contain NaN or inf", geometry.detach())
    _fail_where((geo[..., 0:2] <= 0).any(-1), f"{name}: sigma must be > 0", geo)
    _fail_where(geo[..., 2].abs() >= 1, f"{name}: rho must satisfy |rho| < 1", geo)
    if strict_unit:
        _fail_where((geo[..., 0:2] >= 1).any(-1), f"{name}: sigma must be < 1", geo)
        _fail_where((geo[..., 3:5].abs() >= 1).any(-1), f"{name}: mu must lie strictly inside (-1, 1)", geo)


# --------------------------------------------------------------------------------------------------------------
# 2. Convolutional blocks
# --------------------------------------------------------------------------------------------------------------


class TileGroupNorm(nn.GroupNorm):
    """GroupNorm (32 groups) with statistics per tile: (z - mean) / (std + eps), biased std, eps 1e-6.

    With one tile per side the statistics are the plain per-image group statistics. With np x np tiles they
    form an (np x np) map per group that is upsampled bicubically (align_corners False) to the whole map, so
    colours stay consistent across tile borders. The released code upsamples a 1x1 map even for one tile;
    that is the same number but its backward pass is very slow, so it is skipped here.
    """

    def __init__(self, channels: int):
        super().__init__(num_groups=32, num_channels=channels, eps=1e-6)

    def forward(self, x: torch.Tensor, tiles_per_side: int = 1) -> torch.Tensor:
        batch, channels, height, width = x.shape
        groups, np_ = self.num_groups, tiles_per_side
        tiles = x.reshape(batch, groups, channels // groups, np_, height // np_, np_, width // np_)
        std, mean = torch.std_mean(tiles, dim=(2, 4, 6), correction=0)       # (B, G, np, np)
        if np_ > 1:
            std = F.interpolate(std, size=(height, width), mode="bicubic", align_corners=False)
            mean = F.interpolate(mean, size=(height, width), mode="bicubic", align_corners=False)
        grouped = x.reshape(batch, groups, channels // groups, height, width)
        normed = ((grouped - mean[:, :, None]) / (std[:, :, None] + self.eps)).reshape(batch, channels, height, width)
        return normed * self.weight[:, None, None] + self.bias[:, None, None]


class ResidualBlock(nn.Module):
    """Two (norm -> swish -> conv3x3) steps plus a skip (1x1 conv when the width changes).

    Extra forward arguments go to the norms: the decoder's `TileGroupNorm` takes `tiles_per_side`.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: type[nn.Module]):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1)
                             if in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor, *norm_args: int) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, *norm_args)))
        h = self.conv2(F.silu(self.norm2(h, *norm_args)))
        return self.nin_shortcut(x) + h


def plain_group_norm(channels: int) -> nn.GroupNorm:
    """nn.GroupNorm(32, eps 1e-6): the encoder stem's and the mid attention's norm."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)


@torch.compiler.disable  # inductor would turn the two products back into the slow SDPA kernel
def single_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as two matrix products around a softmax (the released formula).

    For the decoder's head dimension (512 channels, one head) this is 8x faster than
    `F.scaled_dot_product_attention`, whose flash kernel does not take that dimension and whose
    memory-efficient fallback is slow (H200, bf16, B16 over 64x64: 4.8 vs 39.8 ms forward+backward,
    benchmarks/spatial_attention.py). Left out of `torch.compile`, which rewrites the products back into SDPA.
    """
    weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return weights.to(v.dtype) @ v


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a map, with 1x1-conv projections and a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = plain_group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, HW, C)
        out = single_head_attention(q, k, v)
        return x + self.proj_out(out.transpose(1, 2).reshape(batch, channels, height, width))


def repeat_pixels(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 upsampling of (B, C, H, W), `F.interpolate(x, scale_factor=2.0, mode="nearest")`.

    Written as a broadcast and a reshape, in the input's memory layout, so that its backward pass sums each
    2x2 block of the gradient: under torch.compile the interpolation's backward is a scatter with atomic adds,
    which took 5 ms of an M128 bf16 training step on an H200."""
    batch, channels, height, width = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        pixels = x.permute(0, 2, 3, 1)[:, :, None, :, None].expand(batch, height, 2, width, 2, channels)
        return pixels.reshape(batch, 2 * height, 2 * width, channels).permute(0, 3, 1, 2)
    pixels = x[:, :, :, None, :, None].expand(batch, channels, height, 2, width, 2)
    return pixels.reshape(batch, channels, 2 * height, 2 * width)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(repeat_pixels(x))


# --------------------------------------------------------------------------------------------------------------
# 3. Encoder
# --------------------------------------------------------------------------------------------------------------


class StemBlock(ResidualBlock):
    """A stem residual block. `temb_proj` is a time-embedding projection the released blocks own but never
    use; it is kept, frozen, only so the released checkpoints load key for key."""

    RELEASED_TIME_EMBEDDING = 512

    def __init__(self, channels: int):
        super().__init__(channels, channels, plain_group_norm)
        self.temb_proj = nn.Linear(self.RELEASED_TIME_EMBEDDING, channels).requires_grad_(False)


class ConvStem(nn.Module):
    """Full-resolution image features for RoIAlign: conv3x3(3 -> C), then two residual blocks."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels, kernel_size=3, padding=1)
        self.block1 = StemBlock(channels)
        self.block2 = StemBlock(channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(self.conv_in(images)))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TokenAttention(nn.Module):
    """Multi-head self-attention over the tokens of a tile (fused QKV, scaled dot product)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.qkv.weight)   # the initialisation of nn.MultiheadAttention
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, num, width = x.shape
        qkv = self.qkv(x).reshape(batch, num, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])     # (B, heads, N, width / heads)
        return self.proj(out.transpose(1, 2).reshape(batch, num, width))


class RefinementBlock(nn.Module):
    """One encoder block: add the token's pooled RoI samples, then pre-norm attention and MLP (residual).

    `roi_pool` is the block's learned weighting of the token's r*r RoI samples; the encoder applies all
    blocks' weightings at once (`GPSEncoder.pooled_rois`) and hands each block its (B*N, width) result."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.roi_pool = nn.Linear(config.roi_size ** 2, 1)
        self.norm1 = nn.LayerNorm(config.width)
        self.attn = TokenAttention(config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = Mlp(config.width, config.mlp_ratio * config.width, config.width)

    def forward(self, x: torch.Tensor, pooled_rois: torch.Tensor) -> torch.Tensor:
        x = x + pooled_rois.view(x.shape)                                    # (B*N, width) -> (B, N, width)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPSEncoder(nn.Module):
    """Image tile + initial geometry + boxes -> refined GPS-tokens (B, N, 5 + C); any N."""

    def __init__(self, config: GPSTokenConfig):
        super().__init__()
        enc = config.encoder
        self.roi_size = enc.roi_size
        self.stem = ConvStem(enc.stem_channels)
        self.roi_proj = nn.Conv2d(enc.stem_channels, enc.width, kernel_size=1)
        self.query = nn.Parameter(torch.randn(1, enc.width))      # one learned query shared by all tokens
        self.geometry_embed = Mlp(GEOMETRY_DIM, enc.width, enc.width)
        self.blocks = nn.ModuleList(RefinementBlock(enc) for _ in range(enc.depth))
        self.geometry_head = nn.Linear(enc.width, GEOMETRY_DIM)
        self.texture_head = nn.Linear(enc.width, config.texture_channels)
        nn.init.zeros_(self.geometry_head.weight)                  # start from the initial geometry
        nn.init.zeros_(self.geometry_head.bias)

    def sample_rois(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """RoIAlign of the stem features over each token's box: (B, N, 4) in [-1, 1] -> (B*N, stem, r*r)."""
        batch, num, _ = boxes.shape
        height, width = images.shape[-2:]
        features = self.stem(images)
        extent = (width - 1, height - 1, width - 1, height - 1)   # Python numbers: no host-to-device copy (sync)
        pixel_boxes = torch.stack([(boxes[..., i] + 1) * extent[i] / 2 for i in range(4)], dim=-1)
        image_index = torch.arange(batch, device=boxes.device, dtype=boxes.dtype).repeat_interleave(num)
        rois = torch.cat([image_index[:, None], pixel_boxes.reshape(batch * num, 4)], dim=1)
        pooled = roi_align(features, rois, output_size=self.roi_size, spatial_scale=1.0, sampling_ratio=-1,
                           aligned=True)
        return pooled.flatten(2)

    def pooled_rois(self, samples: torch.Tensor) -> torch.Tensor:
        """Every block's pooled RoI input: (B*N, stem, r*r) samples -> (depth, B*N, width).

        Block k adds roi_pool_k(roi_proj(samples)): the r*r samples projected to the encoder width (a 1x1
        conv), then weighted and summed (a linear map r*r -> 1). Both maps are linear, so here the weighting
        comes first, for all blocks in one product, and the projection after it: the same numbers without
        forming the (B*N, width, r*r) projected samples, which each block would otherwise read, and whose
        gradient each block's backward pass would write and sum (about 20 GB of memory traffic per step at
        M128, batch 16)."""
        weights = torch.stack([block.roi_pool.weight[0] for block in self.blocks], dim=1)     # (r*r, depth)
        biases = torch.stack([block.roi_pool.bias[0] for block in self.blocks])               # (depth,)
        weighted = (samples @ weights).permute(2, 0, 1)                                       # (depth, B*N, stem)
        projection = self.roi_proj.weight[:, :, 0, 0]                                         # (width, stem)
        projected = weighted @ projection.t()
        return projected + (self.roi_proj.bias[None, :] * weights.sum(0)[:, None] + biases[:, None])[:, None]

    def forward(self, images: torch.Tensor, init_geometry: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled_rois(self.sample_rois(images, boxes))
        x = self.query + self.geometry_embed(init_geometry)
        for block, block_rois in zip(self.blocks, pooled):
            x = block(x, block_rois)
        geometry = refine_geometry(init_geometry, self.geometry_head(x))
        return torch.cat([geometry, self.texture_head(x)], dim=-1)


# --------------------------------------------------------------------------------------------------------------
# 4. Decoder
# --------------------------------------------------------------------------------------------------------------


class MiddleStage(nn.Module):
    """Residual block, self-attention within each tile, residual block (at the lowest resolution)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResidualBlock(channels, channels, TileGroupNorm)
        self.attn_1 = SpatialSelfAttention(channels)
        self.block_2 = ResidualBlock(channels, channels, TileGroupNorm)

    def forward(self, x: torch.Tensor, tiles_per_side: int) -> torch.Tensor:
        x = self.block_1(x, tiles_per_side)
        x = join_tiles(self.attn_1(split_tiles(x, tiles_per_side)), tiles_per_side)
        return self.block_2(x, tiles_per_side)


class DecoderLevel(nn.Module):
    """The residual blocks of one resolution, then (except at the top level) an x2 upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResidualBlock(i, o, TileGroupNorm) for i, o in zip(widths, widths[1:]))
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor, tiles_per_side: int) -> torch.Tensor:
        for block in self.block:
            x = block(x, tiles_per_side)
        return self.upsample(x)


class GPSDecoder(nn.Module):
    """Rendered feature map (B, C, h, w) -> pixels (B, 3, h * 2^(L-1), w * 2^(L-1)) in [-1, 1] scale.

    With several tiles per side every resblock norm uses per-tile statistics, but the final `norm_out`
    normalises with whole-image statistics: the released decoder calls it without the tile count, and the
    released outputs (fixtures/official/tiny_gpstoken_io `highres_recon`) depend on that.
    """

    def __init__(self, texture_channels: int, config: DecoderConfig):
        super().__init__()
        widths = [config.channels * mult for mult in config.channel_mult]
        self.conv_in = nn.Conv2d(texture_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = MiddleStage(widths[-1])
        levels, width = [], widths[-1]
        for level in reversed(range(len(widths))):          # lowest resolution first
            levels.append(DecoderLevel(width, widths[level], config.blocks_per_level + 1, upsample=level > 0))
            width = widths[level]
        self.up = nn.ModuleList(reversed(levels))            # indexed from the highest resolution, as released
        self.norm_out = TileGroupNorm(width)
        self.conv_out = nn.Conv2d(width, config.out_channels, kernel_size=3, padding=1)
        self.checkpoint_levels = False  # recompute each level's activations in the backward (less memory)

    def forward(self, rendered: torch.Tensor, tiles_per_side: int = 1) -> torch.Tensor:
        x = self.mid(self.conv_in(rendered), tiles_per_side)
        for level in reversed(self.up):
            if self.checkpoint_levels and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(level, x, tiles_per_side, use_reentrant=False)
            else:
                x = level(x, tiles_per_side)
        return self.conv_out(F.silu(self.norm_out(x)))       # whole-image statistics, as released


# --------------------------------------------------------------------------------------------------------------
# 5. GPSToken
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Tokenization:
    """Result of `GPSToken.tokenize` for B whole images of np x np tiles (T = np^2 tiles, N tokens each)."""

    tokens: torch.Tensor          # (B, T*N, 5 + C) merged whole-image tokens, the input of decode(..., np)
    tile_tokens: torch.Tensor     # (B*T, N, 5 + C) tile-local tokens, image-major, tiles row-major
    init_geometry: torch.Tensor   # (B*T, N, 5) the partition's initial geometry, tile-local
    boxes: torch.Tensor           # (B*T, N, 4) the partition's region boxes, tile-local, in [-1, 1]
    tiles_per_side: int


class GPSToken(nn.Module):
    """The GPSToken tokenizer: `encode` tiles into GPS-tokens, `decode` GPS-tokens into pixels."""

    def __init__(self, config: GPSTokenConfig):
        super().__init__()
        self.config = config
        self.encoder = GPSEncoder(config)
        self.decoder = GPSDecoder(config.texture_channels, config.decoder)

    @classmethod
    def from_config_name(cls, name_or_path: str) -> "GPSToken":
        """A randomly initialised model of a shipped config (`gpstoken_m128`) or a YAML file."""
        return cls(load_config(name_or_path))

    def num_parameters(self) -> int:
        """All numbers of the state dict (the released checkpoints hold 128.7 M)."""
        return sum(p.numel() for p in self.parameters())

    def encode(self, images: torch.Tensor, init_geometry: torch.Tensor, boxes: torch.Tensor, *,
               validate: bool = True) -> torch.Tensor:
        """Tiles (B, 3, S, S) in [-1, 1], initial geometry (B, N, 5), boxes (B, N, 4) -> tokens (B, N, 5 + C).

        `validate=False` skips the value checks of the inputs, which read values back from the device (host
        syncs); for a trainer that watches its numbers on the device instead."""
        if validate and not torch.compiler.is_compiling():
            self._check_encoder_inputs(images, init_geometry, boxes)
        return self.encoder(images, init_geometry, boxes)

    def render(self, tokens: torch.Tensor, tiles_per_side: int = 1) -> torch.Tensor:
        """Splat tokens (B, N, 5 + C) into the decoder's input map (B, C, np * 64, np * 64)."""
        return splat_cuda.render(tokens, self.config.render_size * tiles_per_side, self.config.dmax)

    def decode(self, tokens: torch.Tensor, tiles_per_side: int = 1, *, validate: bool = True) -> torch.Tensor:
        """Tokens (B, N, 5 + C) of whole images of np x np tiles -> images (B, 3, np * S, np * S), unclamped.
        `validate=False` skips the value checks of the tokens (host syncs), as in `encode`."""
        if isinstance(tiles_per_side, bool) or not isinstance(tiles_per_side, int) or tiles_per_side < 1:
            raise ValueError(f"decode: tiles_per_side must be a positive int, got {tiles_per_side!r}")
        if validate and not torch.compiler.is_compiling():
            self._check_tokens(tokens)
        return self.decoder(self.render(tokens, tiles_per_side), tiles_per_side)

    def forward(self, images: torch.Tensor, init_geometry: torch.Tensor, boxes: torch.Tensor, *,
                validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One tile per image (training): -> (reconstruction (B, 3, S, S), tokens (B, N, 5 + C))."""
        tokens = self.encode(images, init_geometry, boxes, validate=validate)
        return self.decode(tokens, validate=validate), tokens

    @torch.no_grad()
    def tokenize(self, images: np.ndarray | torch.Tensor, num_tokens: int | None = None,
                 bias: np.ndarray | Sequence[np.ndarray | None] | None = None) -> Tokenization:
        """Whole uint8 RGB images (B, H, W, 3) or (H, W, 3), H = W = np * tile -> partition, encode and merge.

        `num_tokens` per tile defaults to the config's; `bias` is a user allocation map (H, W) for every
        image, or one per image, adding to the partition score of the regions it covers.
        """
        from .partition import entropy_partition

        pixels = self._check_uint8_images(images)
        batch = pixels.shape[0]
        num = self.config.num_tokens if num_tokens is None else num_tokens
        tile, np_ = self.config.tile_size, pixels.shape[1] // self.config.tile_size
        one_map = bias is None or (isinstance(bias, (np.ndarray, torch.Tensor)) and bias.ndim == 2)
        biases = [None if b is None else np.asarray(b) for b in ([bias] * batch if one_map else list(bias))]
        if len(biases) != batch:
            raise ValueError(f"tokenize: got {len(biases)} bias maps for {batch} images")
        parts = [entropy_partition(image, num, min_size=self.config.partition_min_size,
                                   weight=self.config.partition_weight, bias=image_bias, tile_size=tile)
                 for image, image_bias in zip(pixels, biases)]
        device = next(self.parameters()).device
        init_geometry = torch.from_numpy(np.stack([p.geometry for p in parts])).reshape(-1, num, GEOMETRY_DIM)
        boxes = torch.from_numpy(np.stack([p.boxes for p in parts])).reshape(-1, num, 4)
        init_geometry, boxes = init_geometry.to(device), boxes.to(device)
        scaled = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        tile_tokens = self.encode(split_tiles(scaled, np_), init_geometry, boxes)
        return Tokenization(merge_tile_tokens(tile_tokens, np_), tile_tokens, init_geometry, boxes, np_)

    @torch.no_grad()
    def reconstruct(self, images: np.ndarray | torch.Tensor, num_tokens: int | None = None,
                    bias: np.ndarray | Sequence[np.ndarray | None] | None = None) -> torch.Tensor:
        """tokenize + decode: uint8 images (B, H, W, 3) -> reconstructions (B, 3, H, W) in [-1, 1] scale."""
        tokenization = self.tokenize(images, num_tokens, bias)
        return self.decode(tokenization.tokens, tokenization.tiles_per_side)

    # -- input checks ------------------------------------------------------------------------------------------

    def _check_encoder_inputs(self, images: torch.Tensor, init_geometry: torch.Tensor, boxes: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"encode: images must be float (B, 3, H, W), got {tuple(images.shape)} {images.dtype}")
        batch = images.shape[0]
        if init_geometry.dim() != 3 or init_geometry.shape[0] != batch or init_geometry.shape[2] != GEOMETRY_DIM:
            raise ValueError(f"encode: init_geometry must be (B={batch}, N, 5), got {tuple(init_geometry.shape)}")
        if boxes.shape != (*init_geometry.shape[:2], 4):
            raise ValueError(f"encode: boxes must be (B, N, 4) = {(*init_geometry.shape[:2], 4)}, "
                             f"got {tuple(boxes.shape)}")
        if init_geometry.shape[1] < 1:
            raise ValueError("encode: at least one token per tile is needed")
        check_geometry(init_geometry, "encode: init_geometry", strict_unit=True)
        if not bool(torch.isfinite(boxes).all()):
            raise ValueError("encode: boxes contain NaN or inf")

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        dim = self.config.token_dim
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[-1] != dim:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"decode: tokens must be (B, N, {dim}) = 5 geometry + {self.config.texture_channels} "
                             f"texture numbers, got {shape}")
        if not tokens.is_floating_point():
            raise ValueError(f"decode: tokens must be floating point, got {tokens.dtype}")
        check_geometry(tokens, "decode: tokens", strict_unit=False)

    def _check_uint8_images(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        pixels = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if pixels.ndim == 3:
            pixels = pixels[None]
        tile = self.config.tile_size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"tokenize: images must be uint8 RGB (B, H, W, 3) or (H, W, 3), "
                             f"got {pixels.dtype} {pixels.shape}")
        if pixels.shape[1] != pixels.shape[2] or pixels.shape[1] % tile:
            raise ValueError(f"tokenize: images must be square with a side that is a multiple of the tile "
                             f"size {tile}, got {pixels.shape[1]}x{pixels.shape[2]}")
        return pixels

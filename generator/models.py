"""Flow transformers over GPS-tokens: the texture model and the layout model of two-stage generation.

Both stages are SiT/DiT transformers with patch size 1: every token is one sequence element.

* The **texture model** generates the (normalised) 5 + C channels of the 128 tokens of an image given the
  class label and the layout, i.e. the init geometry `(sigma_x, sigma_y, rho, mu_x, mu_y)` of every token.
  The layout enters through an MLP whose output is added to the token embedding *in place of* a positional
  embedding: tokens have no grid position, their geometry is their position.
* The **layout model** generates the N x 5 init geometry itself from the class label; it has no layout
  condition and, optionally, a learned positional embedding.

The condition vector of every block is the sum of a timestep embedding and a label embedding; the blocks
modulate their LayerNorms with it (adaLN-Zero). Tensors are token-major: `(B, N, channels)`. The released
generator stores `(B, C, N, 1)` images; `generator.official` converts.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import Attention, Mlp

from .config import ModelConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive LayerNorm modulation of tokens `x` (B, N, D) by per-sample `shift`, `scale` (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                     Embedding of tokens, time, labels, layout                 #
#################################################################################

class TokenEmbedder(nn.Module):
    """Linear projection of every token's channels to the model width (a patch embedding with patch 1)."""

    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the flow time t in [0, 1] (used unscaled, as released) followed by an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def sinusoidal(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) times -> (B, frequency_embedding_size) features, cosines first, then sines."""
        half = self.frequency_embedding_size // 2
        exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
        freqs = torch.exp(-math.log(self.max_period) * exponents)
        args = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_embedding_size % 2:
            features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
        return features

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.sinusoidal(t)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-label embedding with an extra null class (`num_classes`) and label dropout for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def drop(self, labels: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class: where `force_drop` is true, or at random with `dropout_prob`."""
        if force_drop is None:
            force_drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(force_drop.bool(), torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        if (self.training and self.dropout_prob > 0) or force_drop is not None:
            labels = self.drop(labels, force_drop)
        return self.embedding_table(labels)


class LayoutEmbedder(nn.Sequential):
    """MLP of each token's layout condition (its init geometry), added to the token embedding."""

    def __init__(self, layout_channels: int, hidden_size: int):
        super().__init__(nn.Linear(layout_channels, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))


#################################################################################
#                                 Transformer                                   #
#################################################################################

class SiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated, and branches gated, by the condition (adaLN-Zero).

    Attention is timm's (fused `scaled_dot_product_attention`, qkv bias, optional QK LayerNorm); the MLP uses
    the tanh approximation of GELU; the LayerNorms have no affine parameters (eps 1e-6).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
                              norm_layer=nn.LayerNorm if qk_norm else None)
        self.attn.fused_attn = True
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                       act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm and a linear map from the model width back to the token channels."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class FlowTransformer(nn.Module):
    """SiT over a set of tokens: predicts the flow velocity of noisy tokens `x_t` at time `t` for labels `y`.

    `forward(x, t, y, layout=None)`: x (B, N, in_channels), t (B,) in [0, 1] (a scalar is broadcast),
    y (B,) integer labels in [0, num_classes] (num_classes = null class), layout (B, N, layout_channels)
    exactly when the config has a layout condition. Returns the velocity (B, N, in_channels).
    `force_drop` (B,) bool replaces the labels by the null class (label dropout on demand).

    Inputs are checked (shapes, label range, NaN) unless `check_inputs` is set to False.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.check_inputs = True
        self.checkpoint_blocks = False  # recompute each block's activations in the backward (less memory)
        hidden = config.hidden_size
        self.out_channels = config.in_channels * (2 if config.learn_sigma else 1)

        self.x_embedder = TokenEmbedder(config.in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden, config.frequency_embedding_size)
        self.y_embedder = LabelEmbedder(config.num_classes, hidden, config.class_dropout_prob)
        if config.layout_channels is not None:
            self.cond_embedder = LayoutEmbedder(config.layout_channels, hidden)
        if config.pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, hidden))
        self.blocks = nn.ModuleList([
            SiTBlock(hidden, config.num_heads, config.mlp_ratio, config.qk_norm) for _ in range(config.depth)
        ])
        self.final_layer = FinalLayer(hidden, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation: Xavier linears, small embeddings, and zero adaLN / output layers (adaLN-Zero),
        so that every block starts as the identity and the initial prediction is zero."""
        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(basic_init)
        if self.config.pos_embed:
            nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_class(self) -> int:
        """The label of the unconditional (dropped) class."""
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor,
                layout: torch.Tensor | None = None, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if self.check_inputs:
            self._check(x, t, y, layout)
        tokens = self.x_embedder(x)
        if layout is not None:
            tokens = tokens + self.cond_embedder(layout.to(tokens.dtype))
        elif self.config.pos_embed:
            tokens = tokens + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, force_drop)
        for block in self.blocks:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
        out = self.final_layer(tokens, c)
        return out[..., :self.config.in_channels]

    def _check(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, layout: torch.Tensor | None) -> None:
        cfg, name = self.config, type(self).__name__
        if x.dim() != 3 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"{name}: x must be (B, N, {cfg.in_channels}) tokens, got {tuple(x.shape)}")
        batch, tokens = x.shape[:2]
        if cfg.pos_embed and tokens != cfg.num_tokens:
            raise ValueError(f"{name}: the positional embedding holds {cfg.num_tokens} tokens, x has {tokens}")
        if t.shape != (batch,):
            raise ValueError(f"{name}: t must be a scalar or ({batch},), got {tuple(t.shape)}")
        if y.shape != (batch,) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name}: labels must be an integer tensor of shape ({batch},), "
                             f"got {y.dtype} {tuple(y.shape)}")
        if cfg.layout_channels is None and layout is not None:
            raise ValueError(f"{name}: this model has no layout condition (layout_channels is None)")
        if cfg.layout_channels is not None:
            if layout is None:
                raise ValueError(f"{name}: a layout (B, N, {cfg.layout_channels}) is required")
            if layout.shape != (batch, tokens, cfg.layout_channels):
                raise ValueError(f"{name}: layout must be ({batch}, {tokens}, {cfg.layout_channels}), "
                                 f"got {tuple(layout.shape)}")
        checks = {"labels outside [0, num_classes]": ((y < 0) | (y > cfg.num_classes)).any(),
                  "NaN/inf in x": ~torch.isfinite(x).all(), "NaN/inf in t": ~torch.isfinite(t).all()}
        if layout is not None:
            checks["NaN/inf in layout"] = ~torch.isfinite(layout).all()
        failed = torch.stack(list(checks.values())).tolist()
        if any(failed):
            problems = [problem for problem, bad in zip(checks, failed) if bad]
            detail = f" (labels {sorted(set(y.tolist()))}, null class {cfg.num_classes})" if failed[0] else ""
            raise ValueError(f"{name}: bad input: {', '.join(problems)}{detail}")


class TextureModel(FlowTransformer):
    """Stage 2: normalised token channels given the class and the layout (the released SiT-XL-gs)."""

    def __init__(self, config: ModelConfig):
        if config.layout_channels is None:
            raise ValueError("TextureModel needs layout_channels (the per-token layout condition width)")
        super().__init__(config)


class LayoutModel(FlowTransformer):
    """Stage 1: the N x 5 init geometry of an image given its class; no layout condition."""

    def __init__(self, config: ModelConfig):
        if config.layout_channels is not None:
            raise ValueError("LayoutModel takes no layout condition: set layout_channels to null")
        super().__init__(config)


def build_model(config: ModelConfig) -> FlowTransformer:
    """The texture model when the config has a layout condition, else the layout model."""
    return TextureModel(config) if config.layout_channels is not None else LayoutModel(config)

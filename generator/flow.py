"""Flow matching on the linear path, the velocity loss both trainers use, and the token space of the flow.

Path (SiT's "Linear" interpolant, data at t = 1, noise at t = 0):
    x_t = t * x_data + (1 - t) * x_noise,      velocity target  dx_t/dt = x_data - x_noise.
Timesteps are drawn uniformly on [0, 1] (as released) or logit-normally (t = sigmoid(n), n ~ N(m, s^2)),
which concentrates training on intermediate times.

The texture model's flow runs on *normalised* tokens: the geometry channels as residuals against the init
geometry (the layout), every channel standardised with per-channel statistics of the tokenizer's tokens.
`postprocess_tokens` undoes that exactly as the released inference does.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

GEOMETRY_DIM = 5
SIGMA_RANGE = (1e-5, 1 - 1e-5)
RHO_RANGE = (-0.99999, 0.99999)

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def interpolate(x_data: torch.Tensor, x_noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t x_data + (1 - t) x_noise, with t (B,) broadcast over the other dimensions."""
    t = t.reshape(-1, *([1] * (x_data.dim() - 1))).to(x_data.dtype)
    return t * x_data + (1 - t) * x_noise


def velocity_target(x_data: torch.Tensor, x_noise: torch.Tensor) -> torch.Tensor:
    """The regression target of the linear path: x_data - x_noise."""
    return x_data - x_noise


def sample_timesteps(batch: int, kind: str = "uniform", *, mean: float = 0.0, std: float = 1.0,
                     device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch,) training times in [0, 1]: `uniform` (released) or `logit_normal` (sigmoid of N(mean, std^2))."""
    if kind == "uniform":
        return torch.rand(batch, device=device, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(batch, device=device, generator=generator))
    raise ValueError(f"unknown timestep sampling '{kind}'; known: {TIMESTEP_SAMPLINGS}")


def velocity_loss(model: Callable[..., torch.Tensor], x_data: torch.Tensor, *, t: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None, timesteps: str = "uniform", logit_mean: float = 0.0,
                  logit_std: float = 1.0, **model_kwargs) -> torch.Tensor:
    """Per-sample flow-matching loss, mean over all non-batch dimensions of (model(x_t, t) - (x_data - noise))^2.

    `t` and `noise` are drawn (on x_data's device) when not given; `model_kwargs` go to the model
    (labels `y`, `layout`, ...). Returns (B,) losses; trainers take the mean.
    """
    if noise is None:
        noise = torch.randn_like(x_data)
    if t is None:
        t = sample_timesteps(x_data.shape[0], timesteps, mean=logit_mean, std=logit_std, device=x_data.device)
    if noise.shape != x_data.shape or t.shape != (x_data.shape[0],):
        raise ValueError(f"velocity_loss: noise {tuple(noise.shape)} must match x_data {tuple(x_data.shape)} "
                         f"and t {tuple(t.shape)} must be ({x_data.shape[0]},)")
    prediction = model(interpolate(x_data, noise, t), t, **model_kwargs)
    error = (prediction.float() - velocity_target(x_data, noise).float()) ** 2
    return error.flatten(1).mean(dim=1)


#################################################################################
#                    The token space of the texture flow                        #
#################################################################################

@dataclass(frozen=True)
class TokenStats:
    """Per-channel mean and std of the tokens (geometry channels as residuals against the init geometry)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or len(self.mean) <= GEOMETRY_DIM:
            raise ValueError(f"TokenStats: mean ({len(self.mean)}) and std ({len(self.std)}) need the same "
                             f"length > {GEOMETRY_DIM}")
        if min(self.std) <= 0:
            raise ValueError("TokenStats: every std must be > 0")

    def tensors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return channel_constants(self.mean, like), channel_constants(self.std, like)


def channel_constants(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """`values` as a tensor of `like`'s dtype on its device, made once per (values, device, dtype) and shared (not
    to be modified): a tensor built from Python numbers is a host-to-device copy, which waits for the device."""
    return _device_constants(tuple(values), like.device, like.dtype)


@functools.lru_cache(maxsize=64)
def _device_constants(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


# Statistics of the released GPSToken-M128 tokens used by the released generator (SPEC.md section 7).
M128_TOKEN_STATS = TokenStats(
    mean=(-0.0211, -0.0196, 0.0107, -0.0052, -0.0044, 1.8017, 2.4036, 2.0145, 1.2402, -4.2579, -1.2646,
          -3.0395, 2.2928, 3.2168, -0.1431, 0.1600, 1.3924, 3.2345, 1.6994, 0.8237, 0.3222),
    std=(0.0121, 0.0108, 0.2533, 0.0119, 0.0114, 2.7334, 2.6400, 2.7963, 2.9325, 2.8337, 2.8269, 3.1082,
         3.1412, 2.8038, 2.6501, 2.6163, 2.4718, 2.6958, 2.8157, 2.4744, 2.8200),
)


def _check_tokens(tokens: torch.Tensor, layout: torch.Tensor, stats: TokenStats, what: str) -> None:
    width = len(stats.mean)
    if tokens.dim() != 3 or tokens.shape[-1] != width:
        raise ValueError(f"{what}: tokens must be (B, N, {width}), got {tuple(tokens.shape)}")
    if layout.shape != (*tokens.shape[:2], GEOMETRY_DIM):
        raise ValueError(f"{what}: layout must be ({tokens.shape[0]}, {tokens.shape[1]}, {GEOMETRY_DIM}), "
                         f"got {tuple(layout.shape)}")


def normalize_tokens(tokens: torch.Tensor, layout: torch.Tensor,
                     stats: TokenStats = M128_TOKEN_STATS) -> torch.Tensor:
    """Tokenizer tokens (B, N, 5 + C) -> the flow's space: geometry minus the layout, then standardised."""
    _check_tokens(tokens, layout, stats, "normalize_tokens")
    mean, std = stats.tensors(tokens)
    residual = torch.cat([tokens[..., :GEOMETRY_DIM] - layout.to(tokens.dtype), tokens[..., GEOMETRY_DIM:]], -1)
    return (residual - mean) / std


def postprocess_tokens(samples: torch.Tensor, layout: torch.Tensor,
                       stats: TokenStats = M128_TOKEN_STATS) -> torch.Tensor:
    """Generated (B, N, 5 + C) samples -> decodable tokens, as released: de-normalise, add the layout to the
    geometry channels, clamp sigma to [1e-5, 1 - 1e-5] and rho to [-0.99999, 0.99999] (mu is not clamped)."""
    _check_tokens(samples, layout, stats, "postprocess_tokens")
    mean, std = stats.tensors(samples)
    tokens = samples * std + mean
    geometry = tokens[..., :GEOMETRY_DIM] + layout.to(tokens.dtype)
    sigma = geometry[..., 0:2].clamp(*SIGMA_RANGE)
    rho = geometry[..., 2:3].clamp(*RHO_RANGE)
    return torch.cat([sigma, rho, geometry[..., 3:], tokens[..., GEOMETRY_DIM:]], dim=-1)


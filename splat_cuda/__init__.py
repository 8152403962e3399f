"""splat_cuda: the GPS-token renderer shared by every package.

`render(tokens, size, dmax)` is the one entry point. CUDA tensors go to the run-time compiled kernels
(when they are available), everything else to the PyTorch reference in `splat_cuda.reference`.
"""
from __future__ import annotations

import torch

from .reference import GEOMETRY_DIM, render_reference

__all__ = ["render", "render_reference", "GEOMETRY_DIM"]


def _check(tokens: torch.Tensor, size: tuple[int, int]) -> tuple[int, int]:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"render: tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 3 or tokens.shape[-1] <= GEOMETRY_DIM:
        raise ValueError(f"render: tokens must be (B, N, 5 + C) with C >= 1, got shape {tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise TypeError(f"render: tokens must be floating point, got {tokens.dtype}")
    if isinstance(size, int):
        size = (size, size)
    height, width = (int(s) for s in size)
    if height < 2 or width < 2:
        raise ValueError(f"render: the map must be at least 2x2 (align-corners grid), got {height}x{width}")
    return height, width


def render(tokens: torch.Tensor, size: int | tuple[int, int], dmax: float = 3.0) -> torch.Tensor:
    """Render GPS-tokens (B, N, 5 + C) = [sigma_x, sigma_y, rho, mu_x, mu_y, f_1..f_C] to (B, C, H, W)."""
    height, width = _check(tokens, size)
    return render_reference(tokens, height, width, dmax)

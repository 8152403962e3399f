"""splat_cuda: the GPS-token renderer shared by every package.

`render(tokens, size, dmax)` is the one entry point. CUDA tensors of fp32/bf16/fp16 with at most 64
channels go to the run-time compiled kernels (`splat_cuda.op`); everything else (CPU tensors,
float64, wider features) goes to the PyTorch reference in `splat_cuda.reference`.
"""
from __future__ import annotations

import torch

from .reference import GEOMETRY_DIM, render_reference

__all__ = ["render", "render_reference", "GEOMETRY_DIM"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_MAX_CHANNELS = 64


def _check(tokens: torch.Tensor, size: int | tuple[int, int]) -> tuple[int, int]:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"render: tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 3 or tokens.shape[-1] <= GEOMETRY_DIM:
        raise ValueError(f"render: tokens must be (B, N, 5 + C) with C >= 1, got shape {tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise TypeError(f"render: tokens must be floating point, got {tokens.dtype}")
    if isinstance(size, int):
        size = (size, size)
    if len(size) != 2:
        raise ValueError(f"render: size must be an int or (H, W), got {size!r}")
    height, width = (int(s) for s in size)
    if height < 2 or width < 2:
        raise ValueError(f"render: the map must be at least 2x2 (align-corners grid), got {height}x{width}")
    return height, width


def render(tokens: torch.Tensor, size: int | tuple[int, int], dmax: float = 3.0, *,
           deterministic: bool | None = None) -> torch.Tensor:
    """Render GPS-tokens (B, N, 5 + C) = [sigma_x, sigma_y, rho, mu_x, mu_y, f_1..f_C] to (B, C, H, W).

    The output has the tokens' dtype. `deterministic` (CUDA only) makes gradients bitwise repeatable;
    by default it follows `torch.are_deterministic_algorithms_enabled()`. Non-contiguous tokens are
    copied to contiguous memory first.
    """
    height, width = _check(tokens, size)
    channels = tokens.shape[-1] - GEOMETRY_DIM
    if tokens.is_cuda and tokens.dtype in _KERNEL_DTYPES and channels <= _KERNEL_MAX_CHANNELS:
        from .op import render_cuda

        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        return render_cuda(tokens, height, width, dmax, deterministic)
    return render_reference(tokens, height, width, dmax)

"""The GPS-token renderer in plain PyTorch: the CPU path and the oracle for the CUDA kernels.

For every pixel p and channel k (SPEC.md section 2)::

    out[p, k] = sum_i g_i(p) * f_i[k]
    g_i(p)    = exp(-(dx^2/sx^2 - 2 rho dx dy / (sx sy) + dy^2/sy^2) / (2 (1 - rho^2)))
                if |dx| <= dmax*sx and |dy| <= dmax*sy, else 0

with dx = px - mu_x, dy = py - mu_y and pixel centres on the align-corners grid
px = 2j/(W-1) - 1, py = 2i/(H-1) - 1. The Gaussian is unnormalised and the sum is plain
(no alpha compositing, no normalisation by total weight).

Memory: the weights of one chunk of tokens, (B, n, H*W), are the largest tensor alive. Each chunk
runs under activation checkpointing, so the backward recomputes it instead of keeping every chunk's
weights; nothing of size B*N*H*W*C is ever formed.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

GEOMETRY_DIM = 5  # sigma_x, sigma_y, rho, mu_x, mu_y

# Upper bound on the elements of one chunk's weight tensor (B * n * H * W).
_CHUNK_ELEMENTS = 1 << 24


def pixel_grid(height: int, width: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Align-corners pixel centres in [-1, 1]: (x of each column, y of each row)."""
    xs = torch.linspace(-1.0, 1.0, width, dtype=dtype, device=device)
    ys = torch.linspace(-1.0, 1.0, height, dtype=dtype, device=device)
    return xs, ys


def gaussian_weights(geometry: torch.Tensor, height: int, width: int, dmax: float) -> torch.Tensor:
    """Weights g_i(p) of each token at each pixel: geometry (B, n, 5) -> (B, n, H*W)."""
    sx, sy, rho, mx, my = geometry.unbind(-1)
    xs, ys = pixel_grid(height, width, geometry.dtype, geometry.device)
    dx = xs.view(1, 1, 1, width) - mx[..., None, None]     # (B, n, 1, W)
    dy = ys.view(1, 1, height, 1) - my[..., None, None]    # (B, n, H, 1)
    sx, sy, rho = sx[..., None, None], sy[..., None, None], rho[..., None, None]
    ux, uy = dx / sx, dy / sy
    quad = ux * ux - 2.0 * rho * ux * uy + uy * uy
    g = torch.exp(-0.5 * quad / (1.0 - rho * rho))
    inside = (dx.abs() <= dmax * sx) & (dy.abs() <= dmax * sy)
    g = torch.where(inside, g, torch.zeros((), dtype=g.dtype, device=g.device))
    return g.flatten(2)


def _render_chunk(geometry: torch.Tensor, features: torch.Tensor, height: int, width: int, dmax: float) -> torch.Tensor:
    g = gaussian_weights(geometry, height, width, dmax)    # (B, n, HW)
    return torch.bmm(features.transpose(1, 2), g)          # (B, C, HW)


def render_reference(tokens: torch.Tensor, height: int, width: int, dmax: float = 3.0) -> torch.Tensor:
    """Render GPS-tokens (B, N, 5 + C) into a feature map (B, C, H, W), differentiable in all inputs."""
    batch, num, _ = tokens.shape
    geometry, features = tokens[..., :GEOMETRY_DIM], tokens[..., GEOMETRY_DIM:]
    channels = features.shape[-1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * height * width))
    out = tokens.new_zeros(batch, channels, height * width)
    needs_grad = torch.is_grad_enabled() and tokens.requires_grad
    for start in range(0, num, chunk):
        g, f = geometry[:, start:start + chunk], features[:, start:start + chunk]
        if needs_grad and num > chunk:
            part = checkpoint(_render_chunk, g, f, height, width, dmax, use_reentrant=False)
        else:
            part = _render_chunk(g, f, height, width, dmax)
        out = out + part
    return out.view(batch, channels, height, width)

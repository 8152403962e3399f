"""The GPS-token renderer in plain PyTorch: the CPU path and the readable statement of the maths.

For every pixel p and channel k (SPEC.md section 2)::

    out[p, k] = sum_i g_i(p) * f_i[k]
    g_i(p)    = exp(-(dx^2/sx^2 - 2 rho dx dy / (sx sy) + dy^2/sy^2) / (2 (1 - rho^2)))
                if |dx| <= dmax*sx and |dy| <= dmax*sy, else 0

with dx = px - mu_x, dy = py - mu_y and pixel centres on the align-corners grid
px = 2j/(W-1) - 1, py = 2i/(H-1) - 1. The Gaussian is unnormalised and the sum is plain
(no alpha compositing, no normalisation by total weight).

The exponent is evaluated as (ux - rho uy)^2 / (2 (1 - rho^2)) + uy^2 / 2 (ux = dx/sx, uy = dy/sy),
the same quadratic form written as two non-negative terms, which does not cancel when |rho| -> 1.

Skipping work with the box cut: the map is cut into 16x16 pixel tiles and every tile gathers the
tokens whose box (rounded outwards by a pixel) meets it, padded to the longest list of the call.
Each tile then evaluates only its own tokens on its own pixels (the exact box test still applies
per pixel; padding entries are masked to zero) and contracts weights with features by a batched
matrix product. Tiles are processed in chunks of at most `_CHUNK_ELEMENTS` weights; with several
chunks and gradients on, each chunk runs under activation checkpointing, so the backward recomputes
it instead of keeping it. The largest tensors are (B, tiles, L, 256) weights, L the longest list:
nothing of size B*N*H*W*C is ever formed.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

GEOMETRY_DIM = 5  # sigma_x, sigma_y, rho, mu_x, mu_y

# Upper bound on the elements of one chunk's weights (B * tiles * L * TILE^2).
_CHUNK_ELEMENTS = 1 << 24
TILE = 16


def pixel_grid(height: int, width: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Align-corners pixel centres in [-1, 1]: (x of each column, y of each row)."""
    xs = torch.linspace(-1.0, 1.0, width, dtype=dtype, device=device)
    ys = torch.linspace(-1.0, 1.0, height, dtype=dtype, device=device)
    return xs, ys


def gaussian_weights(geometry: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, dmax: float) -> torch.Tensor:
    """Weights of tokens at a grid of pixel centres.

    geometry (..., 5); xs (..., Wx) and ys (..., Hy), the column and row coordinates each token is
    evaluated at (broadcast against geometry's leading dims) -> weights (..., Hy, Wx).
    """
    sx, sy, rho, mx, my = (v[..., None, None] for v in geometry.unbind(-1))
    dx = xs[..., None, :] - mx        # (..., 1, Wx)
    dy = ys[..., :, None] - my        # (..., Hy, 1)
    ux, uy = dx / sx, dy / sy
    # only the lines marked "full" touch (..., Hy, Wx) tensors; the rest stay one-dimensional
    e = ux - rho * uy                                                      # full
    neg_q = torch.addcmul(-0.5 * uy * uy, e * e, -0.5 / ((1.0 - rho) * (1.0 + rho)))  # full (2)
    inside = (dx.abs() <= dmax * sx).to(dx.dtype) * (dy.abs() <= dmax * sy).to(dx.dtype)  # full
    return torch.exp(neg_q) * inside                                       # full (2)


def _tile_lists(geometry: torch.Tensor, height: int, width: int, dmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile, the tokens whose box may reach it: indices (B, tiles, L) and validity (B, tiles, L).

    Tiles are row-major over a (ceil(H/16), ceil(W/16)) grid; the lists keep token order.
    """
    with torch.no_grad():
        sx, sy, _, mx, my = geometry.unbind(-1)

        def pixel_span(centre, half, n):  # box in pixel-index units, one pixel of slack each side
            scale = (n - 1) / 2.0
            return (centre - half + 1.0) * scale - 1.0, (centre + half + 1.0) * scale + 1.0

        x_lo, x_hi = pixel_span(mx, dmax * sx, width)
        y_lo, y_hi = pixel_span(my, dmax * sy, height)
        starts_x = torch.arange(0, width, TILE, device=geometry.device, dtype=geometry.dtype)
        starts_y = torch.arange(0, height, TILE, device=geometry.device, dtype=geometry.dtype)
        meets_x = (x_hi[..., None] >= starts_x) & (x_lo[..., None] <= starts_x + (TILE - 1))   # (B, N, tx)
        meets_y = (y_hi[..., None] >= starts_y) & (y_lo[..., None] <= starts_y + (TILE - 1))   # (B, N, ty)
        meets = (meets_y[..., :, None] & meets_x[..., None, :]).flatten(2).transpose(1, 2)   # (B, tiles, N)
        counts = meets.sum(-1)
        longest = max(1, int(counts.max().item())) if counts.numel() else 1
        order = torch.sort(meets.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :longest]
        valid = torch.arange(longest, device=geometry.device) < counts[..., None]
    return order, valid


def _render_tiles(geometry: torch.Tensor, features: torch.Tensor, order: torch.Tensor, valid: torch.Tensor,
                  tile_xs: torch.Tensor, tile_ys: torch.Tensor, dmax: float) -> torch.Tensor:
    """Feature map of a chunk of tiles: lists (B, t, L) -> (B, t, C, TILE*TILE)."""
    batch, tiles, longest = order.shape
    flat = order.reshape(batch, tiles * longest, 1)
    geo = torch.gather(geometry, 1, flat.expand(-1, -1, geometry.shape[-1])).view(batch, tiles, longest, -1)
    feat = torch.gather(features, 1, flat.expand(-1, -1, features.shape[-1])).view(batch, tiles, longest, -1)
    g = gaussian_weights(geo, tile_xs[:, None, :], tile_ys[:, None, :], dmax)      # (B, t, L, T, T)
    g = g * valid[..., None, None]
    return torch.matmul(feat.transpose(-1, -2), g.flatten(-2))                    # (B, t, C, T*T)


def render_reference(tokens: torch.Tensor, height: int, width: int, dmax: float = 3.0) -> torch.Tensor:
    """Render GPS-tokens (B, N, 5 + C) into a feature map (B, C, H, W), differentiable in all inputs."""
    batch, num, _ = tokens.shape
    geometry, features = tokens[..., :GEOMETRY_DIM], tokens[..., GEOMETRY_DIM:]
    channels = features.shape[-1]
    tiles_y, tiles_x = -(-height // TILE), -(-width // TILE)
    if num == 0:
        return tokens.new_zeros(batch, channels, height, width)
    order, valid = _tile_lists(geometry.detach(), height, width, dmax)
    # pixel centres of every tile, continuing the grid past the map's edge (cropped at the end)
    step_x, step_y = 2.0 / (width - 1), 2.0 / (height - 1)
    cols = torch.arange(tiles_x * TILE, device=tokens.device, dtype=tokens.dtype) * step_x - 1.0
    rows = torch.arange(tiles_y * TILE, device=tokens.device, dtype=tokens.dtype) * step_y - 1.0
    tile_xs = cols.view(tiles_x, TILE).repeat(tiles_y, 1)               # (tiles, T), row-major tiles
    tile_ys = rows.view(tiles_y, TILE).repeat_interleave(tiles_x, 0)    # (tiles, T)
    num_tiles = tiles_x * tiles_y
    per_tile = batch * order.shape[-1] * TILE * TILE
    chunk = max(1, _CHUNK_ELEMENTS // per_tile)
    needs_grad = torch.is_grad_enabled() and tokens.requires_grad
    parts = []
    for start in range(0, num_tiles, chunk):
        sl = slice(start, start + chunk)
        args = (geometry, features, order[:, sl], valid[:, sl], tile_xs[sl], tile_ys[sl], dmax)
        if needs_grad and num_tiles > chunk:
            parts.append(checkpoint(_render_tiles, *args, use_reentrant=False))
        else:
            parts.append(_render_tiles(*args))
    out = torch.cat(parts, 1).view(batch, tiles_y, tiles_x, channels, TILE, TILE)
    out = out.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, tiles_y * TILE, tiles_x * TILE)
    return out[:, :, :height, :width].contiguous()

"""Tiles of a large image, and merging the tokens of its tiles into one whole-image token set.

Images larger than one tile (256 px for the released models) are cut into `np x np` tiles, row-major within
an image and images one after another (image-major). Each tile is encoded on its own with tile-local
coordinates; for decoding, the tokens of an image's tiles are merged into whole-image coordinates
(SPEC.md section 5): for tile (row i, column j)

    sigma' = sigma / np,  rho' = rho,  mu_x' = -1 + (2 j + mu_x + 1) / np,  mu_y' = -1 + (2 i + mu_y + 1) / np.
"""
from __future__ import annotations

import torch

from .config import GEOMETRY_DIM


def _check_tiles_per_side(tiles_per_side: int) -> int:
    if isinstance(tiles_per_side, bool) or not isinstance(tiles_per_side, int) or tiles_per_side < 1:
        raise ValueError(f"tiles_per_side must be a positive int, got {tiles_per_side!r}")
    return tiles_per_side


def split_tiles(images: torch.Tensor, tiles_per_side: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * np * np, C, H / np, W / np): tiles row-major within each image, image-major."""
    np_ = _check_tiles_per_side(tiles_per_side)
    if images.dim() != 4:
        raise ValueError(f"split_tiles: expected (B, C, H, W), got shape {tuple(images.shape)}")
    batch, channels, height, width = images.shape
    if height % np_ or width % np_:
        raise ValueError(f"split_tiles: a {height}x{width} map cannot be cut into {np_}x{np_} equal tiles")
    tiles = images.reshape(batch, channels, np_, height // np_, np_, width // np_)
    return tiles.permute(0, 2, 4, 1, 3, 5).reshape(batch * np_ * np_, channels, height // np_, width // np_)


def join_tiles(tiles: torch.Tensor, tiles_per_side: int) -> torch.Tensor:
    """Inverse of `split_tiles`: (B * np * np, C, h, w) -> (B, C, h * np, w * np)."""
    np_ = _check_tiles_per_side(tiles_per_side)
    if tiles.dim() != 4 or tiles.shape[0] % (np_ * np_):
        raise ValueError(f"join_tiles: expected (B * {np_ * np_}, C, h, w), got shape {tuple(tiles.shape)}")
    count, channels, height, width = tiles.shape
    images = tiles.reshape(count // (np_ * np_), np_, np_, channels, height, width)
    return images.permute(0, 3, 1, 4, 2, 5).reshape(-1, channels, height * np_, width * np_)


def merge_tile_tokens(tokens: torch.Tensor, tiles_per_side: int) -> torch.Tensor:
    """Tile-local tokens (B * np * np, N, 5 + C) -> whole-image tokens (B, np * np * N, 5 + C), tile after tile."""
    np_ = _check_tiles_per_side(tiles_per_side)
    if tokens.dim() != 3 or tokens.shape[-1] <= GEOMETRY_DIM or tokens.shape[0] % (np_ * np_):
        raise ValueError(f"merge_tile_tokens: expected (B * {np_ * np_}, N, 5 + C), got shape {tuple(tokens.shape)}")
    count, num, dim = tokens.shape
    tiles = tokens.reshape(count // (np_ * np_), np_, np_, num, dim)
    row = torch.arange(np_, device=tokens.device, dtype=tokens.dtype).view(1, np_, 1, 1)
    col = torch.arange(np_, device=tokens.device, dtype=tokens.dtype).view(1, 1, np_, 1)
    sigma, rho, mu_x, mu_y, texture = tiles.split([2, 1, 1, 1, dim - GEOMETRY_DIM], dim=-1)
    merged = torch.cat([
        sigma / np_,
        rho,
        -1 + (2 * col[..., None] + mu_x + 1) / np_,
        -1 + (2 * row[..., None] + mu_y + 1) / np_,
        texture,
    ], dim=-1)
    return merged.reshape(count // (np_ * np_), np_ * np_ * num, dim)

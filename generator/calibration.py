"""Calibration: turn a predicted layout into a valid tiling of the tile (SPEC.md section 7).

The layout model predicts the init geometry ``(sigma_x, sigma_y, rho, mu_x, mu_y)`` of N tokens, but nothing makes
those N Gaussians a partition of the tile, which the texture model was trained on. Calibration keeps only the
predicted centres and rebuilds a partition around them:

1. **Snap** each centre to the nearest cell centre of the ``min_size``-spaced grid (``G = tile_size // min_size``
   cells per side). Centres are in [-1, 1] with the align-corners convention of SPEC.md section 1, so pixel
   ``px = (mu + 1) / 2 * (tile_size - 1)`` and the nearest cell is ``floor((px + 1/2) / min_size)``: a centre
   exactly midway between two cell centres goes to the higher cell. Centres outside the tile snap to the nearest
   border cell (that *is* the nearest cell centre). NaN or infinite centres are an error.
2. **Re-partition** from the whole tile, each time halving the eligible region that holds the most snapped
   centres, until there are N regions. Halving follows SPEC.md section 3: along the longer side, integer halves
   with the first half ``size // 2``, inclusive pixel ranges; a region is eligible while NOT
   (h - 1 <= min_size and w - 1 <= min_size), which on our grid means "larger than one cell".
   Squares split along x. SPEC.md section 7 adds "unless a centre lies exactly on the x split line", but a snapped
   centre sits at a cell centre and every split line runs along cell boundaries, so that case cannot happen after
   snapping and there is no code for it. Consequence: calibration only produces x-first tilings, so an entropy
   partition that halved a square along y (SPEC.md section 3 decides that by score) is not reproduced; its
   centres still snap inside their own regions, but half of their regions are then tiled differently.
3. **Geometry** of each region with the formulas of SPEC.md section 3 (shared with the entropy partition).

Why ``tile_size / min_size`` must be a power of two: then every region the halving can reach is a union of whole
grid cells, so each region is at least ``min_size`` on each side and the smallest region is one cell. Any other
ratio would let halving produce regions smaller than ``min_size`` (e.g. 24 -> 12 -> 6 with min_size 8). It also
caps N at ``G * G`` (1024 for 256/8, 256 for 64/4).

Ties (deterministic, documented): among eligible regions with the same number of snapped centres, the larger
region is halved first; among equal sizes, the one earlier in halving-tree order (left before right, top before
bottom, applied from the tile downwards). This spreads tokens evenly over empty parts of the tile (e.g. when all
centres fall in one corner) instead of piling them up next to the crowded cell.

Token order: the order in which the loop creates regions, a halving's two children appended to the end of the
list (first half first), as in SPEC.md section 3's list (minus its re-sorting, which only serves to pick).

"Needed no correction beyond snapping" (``CalibratedLayouts.exact``) means the re-partition put exactly one
snapped centre in every region: the predicted centres already picked out a valid tiling, one token per region.
When such a tiling exists the greedy finds it, so this flag is a property of the layout, not of the tie rule.

Speed: the halvings form a fixed binary tree (node ``i`` has children ``2i+1`` and ``2i+2``; levels alternate x
and y). Children hold no more centres than their parent and come later in the tie order, so the greedy always
picks the best remaining tree node: the N - 1 halved regions are simply the N - 1 best internal nodes ranked by
(count descending, node index ascending). Counting centres per node (summed-area table) and one argsort per
layout replace the sequential loop, vectorised over the batch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CalibratedLayouts", "calibrate_layouts", "max_regions", "snap_to_grid"]


@dataclass(frozen=True)
class CalibratedLayouts:
    """A batch of B calibrated layouts of N regions each (numpy arrays).

    geometry: float32 (B, N, 5) ``(sigma_x, sigma_y, rho, mu_x, mu_y)``, SPEC.md section 3 formulas.
    boxes: float32 (B, N, 4) ``(x0, y0, x1, y1)`` in [-1, 1], the RoIAlign boxes of the entropy partition.
    ranges: int64 (B, N, 4) inclusive pixel ranges ``(x0, y0, x1, y1)`` of the regions inside the tile.
    counts: int64 (B, N) number of snapped predicted centres that fell in each region.
    exact: bool (B,) the layout needed no correction beyond snapping (every ``counts`` entry is 1).
    """

    geometry: np.ndarray
    boxes: np.ndarray
    ranges: np.ndarray
    counts: np.ndarray
    exact: np.ndarray


@dataclass(frozen=True)
class _HalvingTree:
    """Every region reachable by halving the tile, as a complete binary tree in breadth-first order.

    cells: int64 (2 G^2 - 1, 4) half-open cell ranges ``(cx0, cy0, cx1, cy1)`` of each node.
    num_internal: nodes ``0 .. num_internal - 1`` can be halved; the rest are single cells.
    """

    cells: np.ndarray
    num_internal: int


def max_regions(tile_size: int, min_size: int) -> int:
    """Largest N a tile can be calibrated into: one region per ``min_size`` grid cell."""
    _check_grid(tile_size, min_size)
    return (tile_size // min_size) ** 2


def _check_grid(tile_size: int, min_size: int) -> None:
    for name, value in (("tile_size", tile_size), ("min_size", min_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if min_size < 2:
        raise ValueError(f"min_size must be >= 2 (section 3 never splits regions of side <= min_size + 1), got {min_size}")
    ratio, rest = divmod(tile_size, min_size)
    if tile_size < min_size or rest or ratio & (ratio - 1):
        raise ValueError(
            f"tile_size / min_size must be a power of two so that halving never goes below min_size, "
            f"got tile_size={tile_size}, min_size={min_size}")


@functools.lru_cache(maxsize=None)
def _halving_tree(tile_size: int, min_size: int) -> _HalvingTree:
    grid = tile_size // min_size
    num_internal = grid * grid - 1
    cells = np.zeros((2 * grid * grid - 1, 4), dtype=np.int64)
    cells[0] = (0, 0, grid, grid)
    for node in range(num_internal):
        x0, y0, x1, y1 = cells[node]
        if x1 - x0 >= y1 - y0:  # longer side, x when square
            mid = x0 + (x1 - x0) // 2
            cells[2 * node + 1], cells[2 * node + 2] = (x0, y0, mid, y1), (mid, y0, x1, y1)
        else:
            mid = y0 + (y1 - y0) // 2
            cells[2 * node + 1], cells[2 * node + 2] = (x0, y0, x1, mid), (x0, mid, x1, y1)
    cells.setflags(write=False)
    return _HalvingTree(cells=cells, num_internal=num_internal)


def _ranges_to_geometry(ranges: np.ndarray, tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC.md section 3: inclusive pixel ranges ``(x0, y0, x1, y1)`` -> float32 geometry (..., 5), boxes (..., 4).

    Same operations as tokenizer.partition's private ``_boxes_to_tokens`` (bit-identical float32, see the tests);
    to be replaced by it once tokenizer.partition exposes a public, batched version.
    """
    x0, y0, x1, y1 = np.moveaxis(ranges.astype(np.float64), -1, 0)
    last = tile_size - 1
    geometry = np.stack([(x1 - x0) / tile_size * 2.0 / 3.0, (y1 - y0) / tile_size * 2.0 / 3.0, np.zeros_like(x0),
                         ((x0 + x1) / 2.0 / last - 0.5) * 2.0, ((y0 + y1) / 2.0 / last - 0.5) * 2.0], axis=-1)
    boxes = np.stack([(x0 / last - 0.5) * 2, (y0 / last - 0.5) * 2, (x1 / last - 0.5) * 2, (y1 / last - 0.5) * 2],
                     axis=-1)
    return geometry.astype(np.float32), boxes.astype(np.float32)


def _as_numpy(geometry) -> np.ndarray:
    """Arrays and tensors of any device and dtype (bfloat16 included, which numpy lacks) as a numpy array."""
    if isinstance(geometry, torch.Tensor):
        geometry = geometry.detach().to("cpu", torch.float64).numpy()
    return np.asarray(geometry)


def snap_to_grid(centres, tile_size: int = 256, min_size: int = 8) -> np.ndarray:
    """Grid cell ``(cx, cy)`` (int64, shape ``(..., 2)``) of the cell centre nearest to each ``(mu_x, mu_y)``.

    ``centres`` has shape ``(..., 2)`` in the [-1, 1] tile coordinates of SPEC.md section 1.
    """
    _check_grid(tile_size, min_size)
    centres = _as_numpy(centres).astype(np.float64)
    if centres.shape[-1:] != (2,):
        raise ValueError(f"centres must have shape (..., 2), got {centres.shape}")
    if not np.isfinite(centres).all():
        raise ValueError(f"centres contain {np.count_nonzero(~np.isfinite(centres))} NaN or infinite values")
    pixels = (centres + 1.0) / 2.0 * (tile_size - 1)
    cells = np.floor((pixels + 0.5) / min_size)
    return np.clip(cells, 0, tile_size // min_size - 1).astype(np.int64)


def calibrate_layouts(geometry, *, tile_size: int = 256, min_size: int = 8) -> CalibratedLayouts:
    """Calibrate B predicted layouts of N tokens into valid tilings of a ``tile_size`` tile.

    ``geometry``: (B, N, D) numpy array or tensor with D >= 5 in the token order of SPEC.md section 1; only the
    centres ``mu_x, mu_y`` (columns 3 and 4) are used, the predicted sigma and rho are replaced by the regions'.
    Returns the regions in the entropy partition's format; see the module docstring for the rule, the tie order
    and the meaning of ``exact``.
    """
    geometry = _as_numpy(geometry)
    if geometry.ndim != 3 or geometry.shape[2] < 5:
        raise ValueError(f"geometry must have shape (B, N, >=5), got {geometry.shape}")
    batch, num_tokens = geometry.shape[:2]
    limit = max_regions(tile_size, min_size)
    if not 1 <= num_tokens <= limit:
        raise ValueError(
            f"N={num_tokens} tokens cannot tile a {tile_size}x{tile_size} tile with min_size={min_size}: "
            f"N must be between 1 and {limit}")
    bad = ~np.isfinite(geometry[:, :, 3:5]).all(axis=(1, 2))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} layout(s) have NaN or infinite centres, first at batch index "
                         f"{int(np.argmax(bad))}")

    tree = _halving_tree(tile_size, min_size)
    grid = tile_size // min_size
    cx, cy = np.moveaxis(snap_to_grid(geometry[:, :, 3:5], tile_size, min_size), -1, 0)

    # Snapped centres per cell, then per tree node through a summed-area table.
    flat = (np.arange(batch)[:, None] * grid + cy) * grid + cx
    hist = np.bincount(flat.ravel(), minlength=batch * grid * grid).reshape(batch, grid, grid)
    table = np.zeros((batch, grid + 1, grid + 1), dtype=np.int64)
    table[:, 1:, 1:] = hist.cumsum(axis=1).cumsum(axis=2)
    x0, y0, x1, y1 = tree.cells.T
    counts = table[:, y1, x1] - table[:, y0, x1] - table[:, y1, x0] + table[:, y0, x0]

    # The N - 1 halved regions: best internal nodes by (count desc, index asc), in the order the greedy picks them.
    internal = np.arange(tree.num_internal)
    rank_key = counts[:, :tree.num_internal] * (tree.num_internal + 1) - internal
    halved = np.argsort(-rank_key, axis=1)[:, :num_tokens - 1]
    if num_tokens == 1:
        leaves = np.zeros((batch, 1), dtype=np.int64)
    else:
        children = np.stack([2 * halved + 1, 2 * halved + 2], axis=2).reshape(batch, -1)
        is_halved = np.zeros((batch, tree.cells.shape[0]), dtype=bool)
        np.put_along_axis(is_halved, halved, True, axis=1)
        keep = ~np.take_along_axis(is_halved, children, axis=1)
        leaves = children[keep].reshape(batch, num_tokens)

    leaf_cells = tree.cells[leaves]
    ranges = np.stack([leaf_cells[..., 0] * min_size, leaf_cells[..., 1] * min_size,
                       leaf_cells[..., 2] * min_size - 1, leaf_cells[..., 3] * min_size - 1], axis=-1)
    out_geometry, boxes = _ranges_to_geometry(ranges, tile_size)
    leaf_counts = np.take_along_axis(counts, leaves, axis=1)
    return CalibratedLayouts(geometry=out_geometry, boxes=boxes, ranges=ranges, counts=leaf_counts,
                             exact=(leaf_counts == 1).all(axis=1))

"""Calibration: turn a predicted layout into a valid tiling of the tile (SPEC.md section 7).

The layout model predicts the init geometry ``(sigma_x, sigma_y, rho, mu_x, mu_y)`` of N tokens, but nothing makes
those N Gaussians a partition of the tile, which the texture model was trained on. Calibration keeps only the
predicted centres and rebuilds a partition around them. The aim is that a layout model which predicts a real
entropy partition (SPEC.md section 3) gets exactly that partition back, and anything else the closest tiling the
rule can make.

Coordinates. ``G = tile_size // min_size`` grid cells per side (a power of two, see below). Centres are in [-1, 1]
with the align-corners convention of SPEC.md section 1: pixel ``px = (mu + 1) / 2 * (tile_size - 1)``. A region the
halving can produce covers whole cells, ``[c0, c1)`` per axis, and its centre (SPEC.md section 3 formula) is at
pixel ``(c0 + c1) * min_size / 2 - 0.5``. So every possible region centre lies on the lattice
``px = m * min_size / 2 - 0.5`` with integer ``m = c0 + c1``; ``m`` odd for one-cell-wide regions, even for wider
ones, whose centre lies on the line between two cells. Every ``m`` in ``1 .. 2G - 1`` is the centre of some
region (write ``m = 2^j * odd``: the interval of ``2^j`` cells starting at cell ``(m - 2^j) / 2``, a multiple of
``2^j``), and ``m = c0 + c1`` is also where the halving line of ``[c0, c1)`` runs: a region's split line passes
through its own centre.

1. **Snap** each centre, per axis, to the nearest possible region centre: ``m = floor((2 px + 1) / min_size + 1/2)``
   clipped to ``[1, 2G - 1]``. A centre midway between two lattice points goes to the higher one; centres outside
   the tile go to the nearest border one. NaN or infinite centres are an error. (Snapping to the cell centres of
   the ``min_size`` grid instead, the odd ``m`` only, would move the centre of every region wider than one cell
   off its split line, and so lose the information the next step needs to tell a y split from an x split.)
2. **Re-partition** from the whole tile, each time halving the eligible region that holds the most snapped
   centres, until there are N regions. Halving follows SPEC.md section 3: along the longer side, integer halves
   with the first half ``size // 2``, inclusive pixel ranges; a region is eligible while NOT
   (h - 1 <= min_size and w - 1 <= min_size), which on our grid means "larger than one cell". A square splits
   along x unless a snapped centre in it lies exactly on its x split line (``m_x = c0 + c1``), then along y
   (SPEC.md section 7). Such a centre is the centre of a region as wide as the square, which only a y split can
   leave; and when the entropy partition halved a square along y and then both halves along x, the four quarters
   are those of an x split too, so nothing is lost by splitting x there.
3. **Geometry** of each region with the formulas of SPEC.md section 3 (shared with the entropy partition).

Which region holds a centre. Lattice points with even ``m`` lie on cell boundaries; such a centre counts toward
the cell right of or below the boundary (cell ``m // 2``, the higher index), the side a midway snap also goes to.
This only matters for layouts that are not tilings: a real region's centre lies strictly inside every region that
contains the region, so the convention never changes what a valid tiling gives back.

Exact recovery. Feed in the centres of any tiling the halving can make (squares split either way, e.g. an entropy
partition): every region of the re-partition is then a union of the input's regions and holds one snapped centre
per region inside it, so the greedy only halves regions holding two or more, and by the split rule above each
halving keeps both halves unions of input regions. After N - 1 halvings every region holds exactly one centre:
the input tiling, whatever the tie rule.

Ties (deterministic, documented): among eligible regions with the same number of snapped centres, the larger
region is halved first; among equal sizes, the one earlier in halving-tree order (left before right, top before
bottom, applied from the tile downwards). This spreads tokens evenly over empty parts of the tile (e.g. when all
centres fall in one corner) instead of piling them up next to the crowded cell.

Token order: the order in which the loop creates regions, a halving's two children appended to the end of the
list (first half first), as in SPEC.md section 3's list (minus its re-sorting, which only serves to pick).

"Needed no correction beyond snapping" (``CalibratedLayouts.exact``): the multiset of the regions' centres equals
the multiset of snapped centres, i.e. the snapped prediction already was the centre list of a tiling, which
calibration then returns unchanged (see "Exact recovery"). It implies one snapped centre per region, but is stricter:
a centre that is inside its region but away from the region's centre needed more than snapping.

Why ``tile_size / min_size`` must be a power of two: then every region the halving can reach is a union of whole
grid cells, so each region is at least ``min_size`` on each side and the smallest region is one cell. Any other
ratio would let halving produce regions smaller than ``min_size`` (e.g. 24 -> 12 -> 6 with min_size 8). It also
caps N at ``G * G`` (1024 for 256/8, 256 for 64/4).

Speed: the split direction of a region depends only on the centres inside it, so each layout has a fixed binary
tree of regions (node ``i`` has children ``2i+1`` and ``2i+2``), built level by level for the whole batch.
Children hold no more centres than their parent and come later in the tie order, so the greedy always picks the
best remaining tree node: the N - 1 halved regions are simply the N - 1 best internal nodes ranked by (count
descending, node index ascending). Counting centres per node (summed-area tables) and one argsort per layout
replace the sequential loop, vectorised over the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CalibratedLayouts", "calibrate_layouts", "max_regions", "snap_centres"]


@dataclass(frozen=True)
class CalibratedLayouts:
    """A batch of B calibrated layouts of N regions each (numpy arrays).

    geometry: float32 (B, N, 5) ``(sigma_x, sigma_y, rho, mu_x, mu_y)``, SPEC.md section 3 formulas.
    boxes: float32 (B, N, 4) ``(x0, y0, x1, y1)`` in [-1, 1], the RoIAlign boxes of the entropy partition.
    ranges: int64 (B, N, 4) inclusive pixel ranges ``(x0, y0, x1, y1)`` of the regions inside the tile.
    counts: int64 (B, N) number of snapped predicted centres that fell in each region.
    exact: bool (B,) the layout needed no correction beyond snapping: the regions' centres are the snapped
        centres (as multisets), so every ``counts`` entry is 1.
    """

    geometry: np.ndarray
    boxes: np.ndarray
    ranges: np.ndarray
    counts: np.ndarray
    exact: np.ndarray


def max_regions(tile_size: int, min_size: int) -> int:
    """Largest N a tile can be calibrated into: one region per ``min_size`` grid cell."""
    _check_grid(tile_size, min_size)
    return (tile_size // min_size) ** 2


def _check_grid(tile_size: int, min_size: int) -> None:
    for name, value in (("tile_size", tile_size), ("min_size", min_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if min_size < 2:
        raise ValueError(
            f"min_size must be >= 2 (section 3 never splits regions of side <= min_size + 1), got {min_size}")
    ratio, rest = divmod(tile_size, min_size)
    if tile_size < min_size or rest or ratio & (ratio - 1):
        raise ValueError(
            f"tile_size / min_size must be a power of two so that halving never goes below min_size, "
            f"got tile_size={tile_size}, min_size={min_size}")


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


def snap_centres(centres, tile_size: int = 256, min_size: int = 8) -> np.ndarray:
    """Lattice index ``m`` (int64, shape ``(..., 2)``, per axis) of the possible region centre nearest each centre.

    ``centres`` has shape ``(..., 2)`` ``(mu_x, mu_y)`` in the [-1, 1] tile coordinates of SPEC.md section 1; the
    snapped centre is at pixel ``m * min_size / 2 - 0.5``, ``1 <= m <= 2 * tile_size // min_size - 1`` (module
    docstring: why this lattice, and the tie rule).
    """
    _check_grid(tile_size, min_size)
    centres = _as_numpy(centres).astype(np.float64)
    if centres.shape[-1:] != (2,):
        raise ValueError(f"centres must have shape (..., 2), got {centres.shape}")
    if not np.isfinite(centres).all():
        raise ValueError(f"centres contain {np.count_nonzero(~np.isfinite(centres))} NaN or infinite values")
    pixels = (centres + 1.0) / 2.0 * (tile_size - 1)
    lattice = np.floor((2.0 * pixels + 1.0) / min_size + 0.5)
    return np.clip(lattice, 1, 2 * (tile_size // min_size) - 1).astype(np.int64)


def _halving_trees(on_line_prefix: np.ndarray) -> np.ndarray:
    """Each layout's tree of regions: int64 (4, B, 2 G^2 - 1) half-open cell ranges ``cx0, cy0, cx1, cy1``.

    Breadth-first, node ``i`` halved into ``2i+1`` (left or top) and ``2i+2``; the last ``G^2`` nodes are the
    single cells. ``on_line_prefix`` (B, G + 1, G): running sum over rows of the snapped centres lying on the left
    edge of each cell (even ``m_x``), so that a square knows in O(1) whether a centre lies on its x split line.
    """
    batch, _, grid = on_line_prefix.shape
    flat_prefix = on_line_prefix.ravel()
    row_offset = np.arange(batch)[:, None] * ((grid + 1) * grid)
    cells = np.empty((4, batch, 2 * grid * grid - 1), dtype=np.int64)
    cells[:, :, 0] = np.array([0, 0, grid, grid])[:, None]
    for depth in range(2 * (grid.bit_length() - 1)):
        x0, y0, x1, y1 = cells[:, :, 2**depth - 1:2**(depth + 1) - 1]
        mid_x, mid_y = (x0 + x1) // 2, (y0 + y1) // 2
        column = row_offset + mid_x
        on_line = flat_prefix[column + y1 * grid] > flat_prefix[column + y0 * grid]
        height, width = y1 - y0, x1 - x0
        along_y = (height > width) | ((height == width) & on_line)
        children = cells[:, :, 2**(depth + 1) - 1:2**(depth + 2) - 1]
        children[:, :, 0::2] = x0, y0, np.where(along_y, x1, mid_x), np.where(along_y, mid_y, y1)
        children[:, :, 1::2] = np.where(along_y, x0, mid_x), np.where(along_y, mid_y, y0), x1, y1
    return cells


def _per_cell(values: np.ndarray, batch: int, grid: int) -> np.ndarray:
    """Number of entries of ``values`` (flat cell indices ``(b * G + cy) * G + cx``) per cell, (B, G, G)."""
    return np.bincount(values, minlength=batch * grid * grid).reshape(batch, grid, grid)


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

    grid = tile_size // min_size
    mx, my = np.moveaxis(snap_centres(geometry[:, :, 3:5], tile_size, min_size), -1, 0)

    # A centre belongs to cell m // 2 per axis (a boundary point to the higher cell); count per cell, then per
    # tree node through a summed-area table.
    flat = (np.arange(batch)[:, None] * grid + my // 2) * grid + mx // 2
    on_line_prefix = np.zeros((batch, grid + 1, grid), dtype=np.int64)
    on_line_prefix[:, 1:] = _per_cell(flat[mx % 2 == 0], batch, grid).cumsum(axis=1)
    cells = _halving_trees(on_line_prefix)
    table = np.zeros((batch, grid + 1, grid + 1), dtype=np.int64)
    table[:, 1:, 1:] = _per_cell(flat.ravel(), batch, grid).cumsum(axis=1).cumsum(axis=2)
    x0, y0, x1, y1 = cells
    flat_table = table.ravel()
    row_offset = np.arange(batch)[:, None] * (grid + 1) ** 2
    top, bottom = row_offset + y0 * (grid + 1), row_offset + y1 * (grid + 1)
    counts = flat_table[bottom + x1] - flat_table[top + x1] - flat_table[bottom + x0] + flat_table[top + x0]

    # The N - 1 halved regions: best internal nodes by (count desc, index asc), in the order the greedy picks them.
    num_internal = grid * grid - 1
    rank_key = counts[:, :num_internal] * (num_internal + 1) - np.arange(num_internal)
    halved = np.argsort(-rank_key, axis=1)[:, :num_tokens - 1]
    if num_tokens == 1:
        leaves = np.zeros((batch, 1), dtype=np.int64)
    else:
        children = np.stack([2 * halved + 1, 2 * halved + 2], axis=2).reshape(batch, -1)
        is_halved = np.zeros((batch, cells.shape[2]), dtype=bool)
        np.put_along_axis(is_halved, halved, True, axis=1)
        keep = ~np.take_along_axis(is_halved, children, axis=1)
        leaves = children[keep].reshape(batch, num_tokens)

    leaf_cells = np.take_along_axis(cells, leaves[None], axis=2)
    ranges = np.moveaxis(leaf_cells, 0, -1) * min_size - np.array([0, 0, 1, 1])
    out_geometry, boxes = _ranges_to_geometry(ranges, tile_size)
    leaf_counts = np.take_along_axis(counts, leaves, axis=1)

    # exact: region centres (lattice m = c0 + c1) and snapped centres are the same multiset.
    span = 2 * grid
    region_centres = (leaf_cells[0] + leaf_cells[2]) * span + leaf_cells[1] + leaf_cells[3]
    exact = (np.sort(region_centres, axis=1) == np.sort(mx * span + my, axis=1)).all(axis=1)
    return CalibratedLayouts(geometry=out_geometry, boxes=boxes, ranges=ranges, counts=leaf_counts, exact=exact)

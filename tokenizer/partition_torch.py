"""The entropy partition (SPEC.md section 3) as batched PyTorch, for the GPU (issue 5).

`tokenizer.partition` is the exact reference (OpenCV resize, numpy reductions). This module runs the same greedy
loop on every tile of a batch at once, on any device, so a GPU can partition thousands of images a second:
each step picks one region per tile (highest score, then oldest: the released stable-sort order), scores its
four halves in one vectorised pass and appends the chosen two.

What is reproduced exactly: OpenCV's float32 bilinear resize (a horizontal then a vertical pass, each a
fused multiply-add `s0 + (s1 - s0) * a`, emulated here in float64), OpenCV's float64 Sobel (its order of
additions), the magnitude and the exact bin edges. What may differ in the last bits: the float64 sums of the
entropy (the device's reduction order is not numpy's pairwise one) and the fused multiply-add emulation (a
double rounding in rare halfway cases). Such last-bit differences only matter between regions whose scores
tie to about 1e-15, so nearly all partitions are identical to the reference (tests/test_partition.py).

On a GPU the loop of this module is a long chain of small kernels per step; `tokenizer.partition_cuda` runs the
whole loop as one CUDA kernel instead, and `entropy_partition_torch` uses it where it can. This module's loop stays
the CPU path and the reference it is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenizer.partition import (
    _BIN_WIDTH,
    _MAGNITUDE_BINS,
    _UINT8_TO_SIGNED,
    _ZERO_BIN,
    HIST_BINS,
    SCORE_SIDE,
    _check_settings,
    _token_columns,
    check_tile_sides,
)


def check_image_batch(images: torch.Tensor, tile_size: int) -> None:
    """images: a uint8 RGB tensor (B, H, W, 3) with H and W positive multiples of tile_size."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(f"images must be a uint8 torch tensor, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB of shape (B, H, W, 3), got shape {tuple(images.shape)}")
    check_tile_sides(*images.shape[1:3], tile_size)


def entropy_partition_torch(
    images: torch.Tensor,
    num_tokens: int,
    *,
    min_size: int = 8,
    weight: float = 2.5,
    tile_size: int = 256,
    cuda_kernel: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition uint8 RGB images (B, H, W, 3) on their device; sides must be multiples of tile_size.

    Returns float32 geometry (B, T*N, 5) and boxes (B, T*N, 4), tiles row-major, as
    `tokenizer.partition.entropy_partition_batch` does (without the user bias). On a CUDA device the greedy loop
    runs as one CUDA kernel (`tokenizer.partition_cuda`) when cuda-python is installed and a tile fits the GPU's
    shared memory; `cuda_kernel=False` runs this module's PyTorch loop there instead (for comparisons).
    """
    _check_settings(num_tokens, min_size, weight, tile_size)
    check_image_batch(images, tile_size)
    boxes = _kernel_boxes(images, num_tokens, min_size, weight, tile_size) if cuda_kernel and images.is_cuda else None
    if boxes is None:
        boxes = _loop_boxes(images, num_tokens, min_size, float(weight), tile_size)
    y0, y1, x0, x1 = boxes.double().unbind(-1)
    geometry, region_boxes = _token_columns(y0, y1, x0, x1, tile_size, tile_size)
    batch, height, width = images.shape[:3]
    tokens = (height // tile_size) * (width // tile_size) * num_tokens
    geometry = torch.stack(geometry, dim=-1).float().reshape(batch, tokens, 5)
    region_boxes = torch.stack(region_boxes, dim=-1).float().reshape(batch, tokens, 4)
    return geometry, region_boxes


def _kernel_boxes(images: torch.Tensor, num_tokens: int, min_size: int, weight: float, tile_size: int):
    """The CUDA kernel's boxes (B*T, N, 4), or None where it cannot run (no cuda-python, tiles too large)."""
    from tokenizer import partition_cuda  # not at the top: it imports this module

    if not partition_cuda.supported(images.device, tile_size, num_tokens):
        return None
    return partition_cuda.partition_boxes(images, num_tokens, min_size=min_size, weight=weight, tile_size=tile_size)


def _loop_boxes(images: torch.Tensor, num_tokens: int, min_size: int, weight: float, tile_size: int) -> torch.Tensor:
    """This module's boxes (B*T, N, 4): the released float32 grey conversion, tiling, then the batched loop."""
    batch, height, width = images.shape[:3]
    rows, cols = height // tile_size, width // tile_size
    lut = torch.from_numpy(_UINT8_TO_SIGNED).to(images.device)
    signed = lut[images.long()]
    grey = 0.299 * signed[..., 0] + 0.587 * signed[..., 1] + 0.114 * signed[..., 2]
    unit = (grey + 1.0) / 2.0
    tiles = unit.reshape(batch, rows, tile_size, cols, tile_size).permute(0, 1, 3, 2, 4)
    tiles = tiles.reshape(batch * rows * cols, tile_size, tile_size).contiguous()
    return _greedy_boxes(tiles, num_tokens, min_size, weight)


def _greedy_boxes(tiles: torch.Tensor, num_tokens: int, min_size: int, weight: float) -> torch.Tensor:
    """(R, S, S) float32 tiles of (grey + 1) / 2 -> (R, N, 4) int64 boxes (y0, y1, x0, x1) in token order."""
    count, side = tiles.shape[:2]
    device = tiles.device
    rows = torch.arange(count, device=device)
    boxes = torch.zeros(count, num_tokens, 4, dtype=torch.long, device=device)
    boxes[:, 0] = torch.tensor([0, side - 1, 0, side - 1], device=device)
    scores = torch.full((count, num_tokens), -torch.inf, dtype=torch.float64, device=device)
    scores[:, 0] = _region_scores(tiles, boxes[:, :1], weight)[:, 0]
    created = torch.zeros(count, num_tokens, dtype=torch.long, device=device)
    slots = torch.arange(num_tokens, device=device)

    for step in range(num_tokens - 1):
        heights = boxes[..., 1] - boxes[..., 0]
        widths = boxes[..., 3] - boxes[..., 2]
        candidate = (slots <= step) & ~((heights <= min_size) & (widths <= min_size))
        best = torch.where(candidate, scores, -torch.inf).amax(dim=1, keepdim=True)
        oldest_best = torch.where(candidate & (scores == best), created, created.new_tensor(2 * num_tokens))
        pick = oldest_best.argmin(dim=1)

        parent = boxes[rows, pick]
        halves = _halves(parent)  # (R, 4, 4): x-split left, right, y-split top, bottom
        half_scores = _region_scores(tiles, halves, weight)
        height = parent[:, 1] - parent[:, 0] + 1
        width = parent[:, 3] - parent[:, 2] + 1
        x_weaker = half_scores[:, :2].amin(dim=1) < half_scores[:, 2:].amin(dim=1)  # strict: a tie goes to y
        use_x = ((width > height) | ((width == height) & x_weaker))[:, None]
        chosen = torch.where(use_x[..., None], halves[:, :2], halves[:, 2:])
        chosen_scores = torch.where(use_x, half_scores[:, :2], half_scores[:, 2:])
        # The picked region's slot takes the first child; the second child gets the next free slot. Slots carry
        # no order: the list order is (score, creation index), and the two children are created in this order.
        boxes[rows, pick], scores[rows, pick], created[rows, pick] = chosen[:, 0], chosen_scores[:, 0], 2 * step + 1
        boxes[:, step + 1], scores[:, step + 1], created[:, step + 1] = chosen[:, 1], chosen_scores[:, 1], 2 * step + 2

    # Final order: candidates sorted by score (stable, creation order on ties), then the last two children.
    newest = (created >= 2 * num_tokens - 3) & (created > 0)
    by_age = created.argsort(dim=1)
    aged_scores = torch.where(newest, -torch.inf, scores).gather(1, by_age)
    order = by_age.gather(1, aged_scores.sort(dim=1, descending=True, stable=True).indices)
    return boxes.gather(1, order[..., None].expand(-1, -1, 4))


def _halves(parent: torch.Tensor) -> torch.Tensor:
    """(R, 4) boxes -> (R, 4, 4): the x-split halves then the y-split halves (first half = size // 2).

    A direction is only used when it is the region's longer side (or the region is square), where the halves are
    never empty; the other direction's halves are computed anyway to keep the batch rectangular, and replaced by
    the parent when they would be empty.
    """
    y0, y1, x0, x1 = parent.unbind(-1)
    x_mid = x0 + (x1 - x0 + 1) // 2
    y_mid = y0 + (y1 - y0 + 1) // 2
    halves = torch.stack(
        [
            torch.stack([y0, y1, x0, x_mid - 1], -1),
            torch.stack([y0, y1, x_mid, x1], -1),
            torch.stack([y0, y_mid - 1, x0, x1], -1),
            torch.stack([y_mid, y1, x0, x1], -1),
        ],
        dim=1,
    )
    empty = (halves[..., 1] < halves[..., 0]) | (halves[..., 3] < halves[..., 2])
    return torch.where(empty[..., None], parent[:, None], halves)


def _resize_coefficients(sizes: torch.Tensor):
    """OpenCV INTER_LINEAR taps for `sizes` (Q,) source lengths -> 64: first tap, second tap, float32 weight."""
    out = torch.arange(SCORE_SIDE, device=sizes.device, dtype=torch.float64)
    scale = 1.0 / (SCORE_SIDE / sizes.double())
    position = ((out + 0.5) * scale[:, None] - 0.5).float()
    first = torch.floor(position)
    weight = position - first
    first = first.long()
    below = first < 0
    above = first >= sizes[:, None] - 1
    weight = torch.where(below | above, torch.zeros_like(weight), weight)
    first = torch.where(below, torch.zeros_like(first), first)
    first = torch.where(above, sizes[:, None] - 1, first)
    second = torch.minimum(first + 1, sizes[:, None] - 1)
    return first, second, weight


def _fused_lerp(start: torch.Tensor, end: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 `start + (end - start) * weight` with one rounding for the multiply-add, as OpenCV's resize."""
    return (start.double() + (end - start).double() * weight.double()).float()


def _region_scores(tiles: torch.Tensor, boxes: torch.Tensor, weight: float) -> torch.Tensor:
    """(R, M, 4) boxes (y0, y1, x0, x1) of each tile -> (R, M) float64 scores entropy**weight * h * w."""
    count, per_tile = boxes.shape[:2]
    side = tiles.shape[1]
    flat = boxes.reshape(-1, 4)
    tile_of = torch.arange(count, device=tiles.device).repeat_interleave(per_tile)
    heights = flat[:, 1] - flat[:, 0] + 1
    widths = flat[:, 3] - flat[:, 2] + 1

    # Bilinear resize to 64x64: horizontal pass on the two source rows of each output row, then vertical.
    row_a, row_b, row_w = _resize_coefficients(heights)
    col_a, col_b, col_w = _resize_coefficients(widths)
    base = tile_of * side * side + flat[:, 0] * side + flat[:, 2]
    pixels = tiles.reshape(-1)

    def sample(source_rows, source_cols):
        index = base[:, None, None] + source_rows[:, :, None] * side + source_cols[:, None, :]
        return pixels[index]

    top = _fused_lerp(sample(row_a, col_a), sample(row_a, col_b), col_w[:, None, :])
    bottom = _fused_lerp(sample(row_b, col_a), sample(row_b, col_b), col_w[:, None, :])
    resized = _fused_lerp(top, bottom, row_w[:, :, None])

    # OpenCV's float64 3x3 Sobel with replicated border, in its order of additions.
    padded = F.pad(resized[:, None].double(), (1, 1, 1, 1), mode="replicate")[:, 0]
    diff = padded[:, :, 2:] - padded[:, :, :-2]
    grad_x = (diff[:, :-2] + diff[:, 2:]) + 2 * diff[:, 1:-1]
    smooth = (padded[:, :, :-2] + 2 * padded[:, :, 1:-1]) + padded[:, :, 2:]
    grad_y = smooth[:, 2:] - smooth[:, :-2]
    magnitude = torch.sqrt(grad_x * grad_x + grad_y * grad_y)

    # Exact bins j * _BIN_WIDTH <= m < (j + 1) * _BIN_WIDTH (the estimate is off by at most one).
    bins = (magnitude * (1.0 / _BIN_WIDTH)).long()
    bins -= (magnitude < bins * _BIN_WIDTH).long()
    bins += (magnitude >= (bins + 1) * _BIN_WIDTH).long()
    regions = flat.shape[0]
    offsets = torch.arange(regions, device=tiles.device)[:, None, None] * _MAGNITUDE_BINS
    counts = torch.bincount((bins + offsets).reshape(-1), minlength=regions * _MAGNITUDE_BINS)
    histogram = torch.zeros(regions, HIST_BINS, dtype=torch.float64, device=tiles.device)
    histogram[:, _ZERO_BIN:] = counts.reshape(regions, _MAGNITUDE_BINS).double()

    prob = histogram / (histogram.sum(dim=1, keepdim=True) + 1e-5)
    entropy = -(prob * torch.log2(prob + 1e-10)).sum(dim=1)
    scores = entropy.pow(weight) * heights.double() * widths.double()
    return scores.reshape(count, per_tile)

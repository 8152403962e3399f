"""Entropy-driven initial partition of images into GPSToken regions (SPEC.md section 3).

A tile is cut greedily: the candidate region with the highest score ("how much is going on here", the entropy
of its gradient-magnitude histogram weighted by its area, plus an optional user bias) is halved until the tile
holds `num_tokens` regions. Every region then becomes one token's initial Gaussian and one RoI box.

Released checkpoints were trained on partitions made by a per-image Python loop, so this module reproduces that
loop bit for bit (same regions, same token order) while being much faster:

* The candidate list of the released loop is re-sorted (stable, descending) before every pick and the new
  children are appended at its end. The sorted order is therefore always "score descending, then creation
  order", which a heap keyed by (-score, creation index) gives without re-sorting.
* The released loop scores one region per library call. Here the children of the next few picks of every tile
  of every image of a batch are scored together in one call; a region's score does not depend on when it is
  computed, so computing it a little ahead changes nothing.
* A region's score (resize, Sobel, magnitude histogram, entropy, power) is computed by a small C kernel,
  `_partition_kernel.c`, compiled at run time and cached (`_partition_native`), which gives OpenCV's and numpy's
  results exactly (`_KernelScorer`); it also does the grey conversion. Without a C compiler the histograms are
  made by fused OpenCV passes instead (`_OpenCVScorer`): a float32 approximation whose bin is provably right away
  from bin edges, the few pixels near an edge recomputed in float64 by OpenCV itself. Both give the same scores.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import cv2
import numpy as np

from tokenizer import _partition_native

#: Every region is resized to this square before its gradient histogram is taken, whatever its own size.
SCORE_SIDE = 64
#: The gradient histogram of the released code: 512 equal bins over [-5.5, 5.5], values outside are dropped.
HIST_BINS = 512
HIST_LOW, HIST_HIGH = -5.5, 5.5

# Gradient magnitudes are >= 0, so only the upper half of the bins is ever hit: bin `HIST_BINS // 2 + j` holds
# magnitudes m with j * _BIN_WIDTH <= m < (j + 1) * _BIN_WIDTH. _BIN_WIDTH = 11/512 is a dyadic fraction, so these
# edges are exactly numpy's `histogram` edges, and numpy's edge-corrected binning equals this exact rule.
# The resized region holds values in [0, 1], where a 3x3 Sobel magnitude is at most sqrt(20) ~ 4.47 (the
# maximum of this convex function sits on a corner of [0, 1]^9): the 5.5 end of the range is never reached,
# nothing is dropped, and j stays below 209.
_BIN_WIDTH = (HIST_HIGH - HIST_LOW) / HIST_BINS
_ZERO_BIN = HIST_BINS // 2
_MAGNITUDE_BINS = HIST_BINS - _ZERO_BIN
# Margin (in bin widths) around a bin edge inside which the float32 approximation is not trusted. The float32
# Sobel + magnitude differs from the float64 one by a few float32 roundings of values below 210, about 1e-4 bin
# widths (tests/test_partition.py checks the bound on hard images); the margin leaves a factor of ten or more.
_EDGE_MARGIN = 2e-3

# The released code turns uint8 into float32 through float64: (u / 127.5 - 1).astype(float32).
_UINT8_TO_SIGNED = (np.arange(256) / 127.5 - 1.0).astype(np.float32)


@dataclass(frozen=True)
class Partition:
    """The partition of one image: `tile_grid[0] * tile_grid[1]` tiles, `num_tokens` tokens each.

    geometry: float32 (T*N, 5) initial Gaussians (sigma_x, sigma_y, rho, mu_x, mu_y), tile-local, tiles row-major.
    boxes: float32 (T*N, 4) region boxes (x0, y0, x1, y1) in tile-local [-1, 1] coordinates, for RoIAlign.
    tile_grid: (tile rows, tile columns).
    """

    geometry: np.ndarray
    boxes: np.ndarray
    tile_grid: tuple[int, int]

    @property
    def tiles_per_side(self) -> int:
        """Tiles along each side of a square image (the decoder's `np`)."""
        rows, cols = self.tile_grid
        if rows != cols:
            raise ValueError(f"the image is not square in tiles ({rows} x {cols}); use tile_grid")
        return rows


# --------------------------------------------------------------------------------------------------------------
# Input checks and conversions


def grey_image(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> float32 grey in [-1, 1], with the released conversion and rounding."""
    signed = _UINT8_TO_SIGNED[image]
    return 0.299 * signed[..., 0] + 0.587 * signed[..., 1] + 0.114 * signed[..., 2]


def _halving_leaves(side: int, min_size: int) -> int:
    """How many pieces one axis of `side` pixels ends in when halved until every piece is <= min_size + 1."""
    if side - 1 <= min_size:
        return 1
    return _halving_leaves(side // 2, min_size) + _halving_leaves(side - side // 2, min_size)


def max_tokens(tile_height: int, tile_width: int, min_size: int = 8) -> int:
    """The largest token count a tile can be split into (regions stop splitting at min_size + 1 pixels a side).

    A region is split along its longer side, so each axis is halved independently until its pieces are small;
    the leaf count is the product of the two axes' counts.
    """
    return _halving_leaves(tile_height, min_size) * _halving_leaves(tile_width, min_size)


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"array of shape {value.shape} and dtype {value.dtype}"
    return type(value).__name__


def _check_settings(num_tokens, min_size, weight, tile_size) -> None:
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 2:
        raise ValueError(f"tile_size must be an integer >= 2, got {tile_size!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ValueError(f"min_size must be an integer >= 1, got {min_size!r}")
    if not (isinstance(weight, (int, float, np.floating)) and math.isfinite(weight)):
        raise ValueError(f"weight must be a finite number, got {weight!r}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
    limit = max_tokens(tile_size, tile_size, min_size)
    if num_tokens > limit:
        raise ValueError(
            f"num_tokens={num_tokens} is larger than a {tile_size}x{tile_size} tile allows with "
            f"min_size={min_size} (at most {limit})"
        )


def _check_images(images: np.ndarray, tile_size: int) -> None:
    """images: uint8 (B, H, W, 3) with H and W multiples of tile_size."""
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8 RGB, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB of shape (H, W, 3) or (B, H, W, 3), got shape {images.shape}")
    check_tile_sides(*images.shape[1:3], tile_size)


def check_tile_sides(height: int, width: int, tile_size: int) -> None:
    """Image sides must be positive multiples of the tile size (they are cut into row-major tiles)."""
    if height == 0 or width == 0 or height % tile_size or width % tile_size:
        raise ValueError(f"image sides ({height} x {width}) must be positive multiples of tile_size={tile_size}")


def _check_bias(bias: np.ndarray, expected_shape: tuple[int, ...]) -> None:
    if not isinstance(bias, np.ndarray):
        raise TypeError(f"bias must be a numpy array, got {type(bias).__name__}")
    if bias.dtype != np.float32:
        raise TypeError(f"bias must be float32 (the released code sums it in float32), got dtype {bias.dtype}")
    if bias.shape != expected_shape:
        raise ValueError(f"bias must have shape {expected_shape} (the images' height and width), got {bias.shape}")
    if not np.isfinite(bias).all():
        raise ValueError("bias contains NaN or infinite values")


def bias_from_boxes(height: int, width: int, boxes) -> np.ndarray:
    """A user bias map that steers tokens into boxes.

    boxes: iterable of (x0, y0, x1, y1, weight) in pixels, inclusive-exclusive. Each pixel of a box adds `weight`
    to the score of every region holding it, so a region's score grows by weight * (its overlap with the box)
    and regions over the box get split first. Overlapping boxes add up. Returns float32 (height, width).
    """
    bias = np.zeros((height, width), np.float32)
    for box in boxes:
        if len(box) != 5:
            raise ValueError(f"each box must be (x0, y0, x1, y1, weight), got {box!r}")
        x0, y0, x1, y1, box_weight = box
        if not math.isfinite(box_weight):
            raise ValueError(f"box weight must be finite, got {box_weight!r}")
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"box {box!r} is empty or outside the {height} x {width} image")
        bias[int(y0):int(y1), int(x0):int(x1)] += np.float32(box_weight)
    return bias


# --------------------------------------------------------------------------------------------------------------
# Region scores


def _unit_images(images: np.ndarray, kernel) -> np.ndarray:
    """uint8 RGB (B, H, W, 3) -> float32 (B, H, W) tiles values (grey + 1) / 2, the released arithmetic."""
    if kernel is None:
        return (grey_image(images) + 1.0) / 2.0
    images = np.ascontiguousarray(images)
    units = np.empty(images.shape[:3], np.float32)
    kernel.unit_image(images.ctypes.data, units.size, _UINT8_TO_SIGNED.ctypes.data, units.ctypes.data)
    return units


def _histogram_entropy(histogram: np.ndarray) -> np.ndarray:
    """Entropy in bits of each row of int64 (K, 256) counts (the upper half of the released 512-bin
    histogram; the lower half is always empty), with the released normalisation and epsilons.

    Row-wise numpy reductions use the same pairwise summation as the released one-histogram-at-a-time calls.
    That summation splits 512 terms into halves of 256, and the empty lower half sums to -0.0, so summing the
    upper half alone gives the released value bit for bit (tests/test_partition.py checks both).
    """
    prob = histogram / (histogram.sum(axis=1, keepdims=True) + 1e-5)
    return -np.sum(prob * np.log2(prob + 1e-10), axis=1)


# Every histogram counts the SCORE_SIDE**2 magnitudes of a resized region (none is ever dropped), so a bin's
# term p * log2(p + 1e-10) of the released entropy depends on its count alone: the kernel looks the terms up
# here. They are computed by numpy itself, whose log2 need not be the C library's.
_COUNT_PROBABILITY = np.arange(SCORE_SIDE**2 + 1) / (SCORE_SIDE**2 + 1e-5)
_ENTROPY_TERMS = _COUNT_PROBABILITY * np.log2(_COUNT_PROBABILITY + 1e-10)


class _OpenCVScorer:
    """Region scores from gradient-magnitude histograms made in a few fused OpenCV passes (no C compiler needed).

    Per region (inclusive pixel ranges of a tile of `(grey + 1) / 2`): OpenCV bilinear resize to 64x64 (the
    definition, called per region exactly as the released code does), 3x3 Sobel in x and y with replicated border
    in float64, magnitude sqrt(gx^2 + gy^2), and its bin of the 512-bin histogram over [-5.5, 5.5].

    The per-pixel work is done in a few fused OpenCV passes over all regions side by side:

    * Each resized region sits in a 66x66 block of one wide float32 image, its border rows and columns replicated,
      so one Sobel call gives every region its own replicated-border result.
    * The Sobel and magnitude are taken in float32, already scaled to bin widths (`v`). They differ from the
      float64 values by far less than `_EDGE_MARGIN` bin widths, so `floor(v - margin) == floor(v + margin)`
      proves the exact bin. Both floors come from one saturating float -> uint8 conversion each, and a 2-D
      uint8 histogram over (region id, bin) counts all regions in one pass.
    * The few pixels near a bin edge (about 0.4 %) are recomputed exactly: OpenCV's own
      float64 Sobel of their 3x3 neighbourhood, float64 magnitude, exact bin, and the counts are corrected.
    """

    _BLOCK = SCORE_SIDE + 2  # a region's block: replicated border, 64 pixels, replicated border
    # Regions per pass: small enough for the float32 images to stay in cache (and for uint8 region ids; id 255
    # marks the border pixels, which are not counted).
    _MAX_REGIONS = 64

    def __init__(self, tiles: list[np.ndarray]):
        self.tiles = tiles
        self._region_ids: dict[int, np.ndarray] = {}

    def scores(self, regions: np.ndarray, weight: float) -> list[float]:
        """regions: int (K, 5) rows (tile index, y0, y1, x0, x1), inclusive. entropy**weight * height * width,
        with Python's float power (the C library's pow, as the released numpy scalars use)."""
        entropies = _histogram_entropy(self.magnitude_counts(regions)).tolist()
        return [
            entropy**weight * (y1 - y0 + 1) * (x1 - x0 + 1)
            for entropy, (_, y0, y1, x0, x1) in zip(entropies, regions.tolist())
        ]

    def magnitude_counts(self, regions: np.ndarray) -> np.ndarray:
        """regions: int (K, 5) rows (tile index, y0, y1, x0, x1). Returns int64 (K, 256) counts of the upper bins."""
        regions = regions.tolist()
        chunks = [regions[start:start + self._MAX_REGIONS] for start in range(0, len(regions), self._MAX_REGIONS)]
        return np.concatenate([self._magnitude_counts(chunk) for chunk in chunks])

    def _magnitude_counts(self, regions) -> np.ndarray:
        """int64 (K, 256) counts of the magnitude bins [j, j + 1) * _BIN_WIDTH of each region."""
        count, block = len(regions), self._BLOCK
        wide = np.empty((block, count * block), np.float32)
        blocks = wide.reshape(block, count, block)
        for k, (tile, y0, y1, x0, x1) in enumerate(regions):
            left = k * block + 1
            region = self.tiles[tile][y0:y1 + 1, x0:x1 + 1]
            cv2.resize(region, (SCORE_SIDE, SCORE_SIDE), dst=wide[1:-1, left:left + SCORE_SIDE])
        blocks[:, :, 0] = blocks[:, :, 1]
        blocks[:, :, -1] = blocks[:, :, -2]
        blocks[0] = blocks[1]
        blocks[-1] = blocks[-2]

        bins_per_unit = 1.0 / _BIN_WIDTH
        grad_x = cv2.Sobel(wide, cv2.CV_32F, 1, 0, ksize=3, scale=bins_per_unit, borderType=cv2.BORDER_REPLICATE)
        grad_y = cv2.Sobel(wide, cv2.CV_32F, 0, 1, ksize=3, scale=bins_per_unit, borderType=cv2.BORDER_REPLICATE)
        scaled = cv2.magnitude(grad_x, grad_y)
        # Saturating round(v - 0.5 -/+ margin) to uint8 = floor(v -/+ margin), clamped to [0, 255].
        low = cv2.add(scaled, -0.5 - _EDGE_MARGIN, dtype=cv2.CV_8U)
        high = cv2.add(scaled, -0.5 + _EDGE_MARGIN, dtype=cv2.CV_8U)
        counts = cv2.calcHist(
            [self._ids(count), low], [0, 1], None, [count, _MAGNITUDE_BINS], [0, count, 0, _MAGNITUDE_BINS]
        )
        counts = counts.astype(np.int64)

        unsure = cv2.findNonZero(cv2.compare(low, high, cv2.CMP_NE))
        if unsure is not None:
            cols, rows = unsure.reshape(-1, 2).T.astype(np.intp)
            # Unsure pixels on the replicated borders are not counted; when they are the only ones, there is
            # nothing to correct (and OpenCV's Sobel refuses the empty stack of neighbourhoods).
            inner = (rows >= 1) & (rows <= SCORE_SIDE) & (cols % block >= 1) & (cols % block <= SCORE_SIDE)
            rows, cols = rows[inner], cols[inner]
            if len(rows):
                region_of = cols // block
                np.subtract.at(counts, (region_of, low[rows, cols]), 1)
                np.add.at(counts, (region_of, self._exact_bins(wide, rows, cols)), 1)
        return counts

    def _ids(self, count: int) -> np.ndarray:
        """uint8 image of the wide layout holding each pixel's region index, 255 on the replicated borders."""
        if count not in self._region_ids:
            ids = np.full((self._BLOCK, count, self._BLOCK), 255, np.uint8)
            ids[1:-1, :, 1:-1] = np.arange(count, dtype=np.uint8)[None, :, None]
            self._region_ids[count] = ids.reshape(self._BLOCK, count * self._BLOCK)
        return self._region_ids[count]

    @staticmethod
    def _exact_bins(wide: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Exact magnitude bins (0-based, above the zero bin) of the given inner pixels of the wide image.

        The float64 Sobel of a pixel only reads its 3x3 neighbourhood, which the replicated borders of its block
        already hold, so the neighbourhoods are stacked into one (3P, 3) image and OpenCV's own Sobel gives each
        centre's value.
        """
        offsets = np.arange(-1, 2)
        patches = wide[(rows[:, None] + offsets)[:, :, None], (cols[:, None] + offsets)[:, None, :]]
        patches = np.ascontiguousarray(patches.reshape(-1, 3))
        grad_x = cv2.Sobel(patches, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)[1::3, 1]
        grad_y = cv2.Sobel(patches, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)[1::3, 1]
        magnitude = np.sqrt(grad_x**2 + grad_y**2)
        estimate = (magnitude * (1.0 / _BIN_WIDTH)).astype(np.intp)
        # The estimate is off by at most one; the edges j * _BIN_WIDTH are exact doubles.
        estimate -= magnitude < estimate * _BIN_WIDTH
        estimate += magnitude >= (estimate + 1) * _BIN_WIDTH
        return estimate


class _KernelScorer:
    """Region scores, all the per-region work in one call of the compiled kernel (`_partition_kernel.c`).

    The kernel repeats exactly what OpenCV and numpy compute for a region (resize, float64 Sobel, histogram,
    entropy, power; checked against them by tests/test_partition.py). Regions one pixel thin (possible only with
    min_size <= 2) are left to `_OpenCVScorer`: OpenCV resizes them by another route than all the others.
    """

    def __init__(self, tiles: list[np.ndarray], kernel: _partition_native.Kernel):
        for tile in tiles:
            if tile.dtype != np.float32 or tile.strides[1] != 4 or tile.strides[0] % 4:
                raise ValueError("tiles must be float32 with contiguous rows")
        self.tiles = tiles  # keeps the memory the addresses below point into alive
        self.kernel = kernel
        self.base = np.array([tile.ctypes.data for tile in tiles], np.int64)
        self.stride = np.array([tile.strides[0] // 4 for tile in tiles], np.int64)
        self.fallback = _OpenCVScorer(tiles)

    def scores(self, regions: np.ndarray, weight: float) -> list[float]:
        """regions: int32 (K, 5) rows (tile index, y0, y1, x0, x1), inclusive. entropy**weight * height * width."""
        regions = np.ascontiguousarray(regions, np.int32)
        thin = (regions[:, 1] == regions[:, 2]) | (regions[:, 3] == regions[:, 4])
        if not thin.any():
            return self.native_scores(regions, weight).tolist()
        scores = np.empty(len(regions))
        scores[~thin] = self.native_scores(regions[~thin], weight)
        scores[thin] = self.fallback.scores(regions[thin], weight)
        return scores.tolist()

    def native_scores(self, regions: np.ndarray, weight: float, counts: np.ndarray | None = None) -> np.ndarray:
        """The kernel's scores of int32 (K, 5) regions; `counts`, if given, int64 (K, 256), gets the histograms."""
        scores = np.empty(len(regions))
        status = self.kernel.region_scores(
            len(regions), regions.ctypes.data, self.base.ctypes.data, self.stride.ctypes.data,
            _ENTROPY_TERMS.ctypes.data, weight, scores.ctypes.data, None if counts is None else counts.ctypes.data,
        )
        if status != 0:
            raise RuntimeError("partition kernel: a value or gradient magnitude is out of range (tiles not in [0, 1]?)")
        return scores


def _make_scorer(tiles: list[np.ndarray], kernel):
    """The compiled-kernel scorer when the kernel is available, else the OpenCV one (same results)."""
    return _OpenCVScorer(tiles) if kernel is None else _KernelScorer(tiles, kernel)


# --------------------------------------------------------------------------------------------------------------
# The greedy loop


class _TileCandidates:
    """The candidate regions of one tile, in the order of the released, repeatedly stable-sorted list.

    Entries are (-score, creation index, box): a heap of them has at its top the first entry of the sorted list.
    Splittable candidates whose split (children and their scores) is not computed yet wait in `unscored`; those
    whose split is known wait in `scored`, with the split appended to the entry; regions too small to split are
    never picked and wait in `leaves`. A region's children and their scores do not depend on when they are
    computed, so the splits of the best unscored candidates are computed ahead, many tiles in one kernel call,
    and the loop then advances on its own as long as its next pick is scored.
    """

    def __init__(self, root_score: float, root: tuple[int, int, int, int], min_size: int, steps: int):
        self.min_size = min_size
        self.steps_left = steps
        self.unscored: list = []
        self.scored: list = []
        self.leaves: list = []
        self.created = 0
        self._add(root_score, root)

    def _add(self, score: float, box: tuple[int, int, int, int]) -> None:
        y0, y1, x0, x1 = box
        entry = (-score, self.created, box)
        self.created += 1
        if y1 - y0 <= self.min_size and x1 - x0 <= self.min_size:
            self.leaves.append(entry)
        else:
            heapq.heappush(self.unscored, entry)

    def advance(self) -> None:
        """Split the best candidate, as long as its split is known and tokens are missing."""
        scored, unscored = self.scored, self.unscored
        while self.steps_left and scored and (not unscored or scored[0] < unscored[0]):
            for score, child in heapq.heappop(scored)[3]:
                self._add(score, child)
            self.steps_left -= 1

    def to_score(self, lookahead: int) -> list:
        """Take the best unscored candidates (at most `lookahead`, and no more than the splits still to do): their
        splits are computed next. All of them are picked eventually unless the token count is reached first."""
        if not self.steps_left:
            return []
        count = min(lookahead, self.steps_left, len(self.unscored))
        return [heapq.heappop(self.unscored) for _ in range(count)]

    def final_boxes(self) -> list[tuple[int, int, int, int]]:
        """Boxes in the released final list order: the candidates sorted, except the last pick's two children,
        which the released loop appends, unsorted, after its last sort."""
        entries = self.leaves + self.unscored + [entry[:3] for entry in self.scored]
        newest = self.created - 2 if self.created > 1 else self.created
        settled = sorted(entry for entry in entries if entry[1] < newest)
        appended = sorted((entry for entry in entries if entry[1] >= newest), key=lambda entry: entry[1])
        return [box for _, _, box in settled + appended]


def _split_options(box: tuple[int, int, int, int], min_size: int) -> list[list[tuple[int, int, int, int]]]:
    """The candidate splits of a picked region: [x halves] or [y halves], or both for a square region.

    A picked region has a side of at least min_size + 2, and only its longer side (or both, when square) is
    tried, so every tried direction is possible and the released "impossible split scores 1e6" rule never fires.
    """
    y0, y1, x0, x1 = box
    height, width = y1 - y0 + 1, x1 - x0 + 1
    options = []
    if width >= height and width > min_size:
        mid = x0 + width // 2
        options.append([(y0, y1, x0, mid - 1), (y0, y1, mid, x1)])
    if height >= width and height > min_size:
        mid = y0 + height // 2
        options.append([(y0, mid - 1, x0, x1), (mid, y1, x0, x1)])
    return options


def _chosen_split(scored_options: list[list[tuple[float, tuple[int, int, int, int]]]]):
    """A square region is split along x only when x's weaker child is strictly weaker than y's (ties go to y)."""
    if len(scored_options) == 1:
        return scored_options[0]
    x_split, y_split = scored_options
    return x_split if min(x_split)[0] < min(y_split)[0] else y_split


def _partition_tiles(
    units: list[np.ndarray],
    biases: list[np.ndarray] | None,
    num_tokens: int,
    min_size: int,
    weight: float,
    kernel,
    lookahead: int = 8,
) -> list[list[tuple[int, int, int, int]]]:
    """Run the greedy loop on many tiles in lockstep; returns each tile's boxes (y0, y1, x0, x1) in token order.

    units: float32 tiles of (grey + 1) / 2; biases: matching float32 bias tiles, or None. Each round scores, in
    one call, the children of up to `lookahead` upcoming picks of every unfinished tile.
    """
    scorer = _make_scorer(units, kernel)

    def scores(requests: list[tuple[int, int, int, int, int]]) -> list[float]:
        result = scorer.scores(np.array(requests, np.int32), weight)
        if biases is not None:
            for k, (tile, y0, y1, x0, x1) in enumerate(requests):
                result[k] += float(np.sum(biases[tile][y0:y1 + 1, x0:x1 + 1]))
        return result

    roots = [(0, unit.shape[0] - 1, 0, unit.shape[1] - 1) for unit in units]
    root_scores = scores([(tile, *box) for tile, box in enumerate(roots)])
    states = [_TileCandidates(score, box, min_size, num_tokens - 1) for box, score in zip(roots, root_scores)]
    while True:
        pending = []  # (tile, entry, split options)
        requests = []  # (tile, *child box), in the order of pending's options
        for tile, state in enumerate(states):
            state.advance()
            for entry in state.to_score(lookahead):
                options = _split_options(entry[2], min_size)
                pending.append((tile, entry, options))
                requests.extend((tile, *child) for option in options for child in option)
        if not pending:
            break
        flat_scores = iter(scores(requests))
        for tile, entry, options in pending:
            split = _chosen_split([[(next(flat_scores), child) for child in option] for option in options])
            heapq.heappush(states[tile].scored, (*entry, split))
    return [state.final_boxes() for state in states]


def _token_columns(y0, y1, x0, x1, height: int, width: int):
    """Inclusive pixel ranges of regions of an h x w tile -> geometry columns and RoI box columns, float64.

    y0..x1: float64 numpy arrays or torch tensors (integer valued). The arithmetic follows the released float64
    expressions operation by operation; callers round the stacked columns to float32.
    Geometry (sigma_x, sigma_y, rho, mu_x, mu_y); boxes (x0, y0, x1, y1) in [-1, 1].
    """
    geometry = (
        (x1 - x0) / width * 2.0 / 3.0,
        (y1 - y0) / height * 2.0 / 3.0,
        (x1 - x0) * 0.0,
        ((x1 + x0) / 2.0 / (width - 1) - 0.5) * 2.0,
        ((y1 + y0) / 2.0 / (height - 1) - 0.5) * 2.0,
    )
    boxes = (
        (x0 / (width - 1) - 0.5) * 2,
        (y0 / (height - 1) - 0.5) * 2,
        (x1 / (width - 1) - 0.5) * 2,
        (y1 / (height - 1) - 0.5) * 2,
    )
    return geometry, boxes


def _boxes_to_tokens(boxes: list[tuple[int, int, int, int]], height: int, width: int):
    """Integer boxes (y0, y1, x0, x1) of an h x w tile -> float32 geometry (N, 5) and RoI boxes (N, 4)."""
    geometry, region_boxes = _token_columns(*np.asarray(boxes, dtype=np.float64).T, height, width)
    return np.stack(geometry, axis=1).astype(np.float32), np.stack(region_boxes, axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Public API


def entropy_partition(
    image: np.ndarray,
    num_tokens: int,
    *,
    min_size: int = 8,
    weight: float = 2.5,
    bias: np.ndarray | None = None,
    tile_size: int = 256,
) -> Partition:
    """Partition one uint8 RGB image (H, W, 3) into `num_tokens` regions per tile_size x tile_size tile.

    H and W must be multiples of tile_size; tiles are taken row-major and each gets its own tile-local tokens.
    bias: optional float32 (H, W) map; a region's score gets the sum of the map over the region.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise ValueError(f"expected one uint8 RGB image of shape (H, W, 3), got {_describe(image)}")
    if bias is not None:
        if not isinstance(bias, np.ndarray) or bias.ndim != 2:
            raise ValueError(f"bias must be a float32 (H, W) map, got {_describe(bias)}")
        bias = bias[None]
    image = image[None]
    geometry, boxes = entropy_partition_batch(
        image, num_tokens, min_size=min_size, weight=weight, bias=bias, tile_size=tile_size
    )
    height, width = image.shape[1:3]
    return Partition(geometry[0], boxes[0], (height // tile_size, width // tile_size))


def entropy_partition_batch(
    images: np.ndarray,
    num_tokens: int,
    *,
    min_size: int = 8,
    weight: float = 2.5,
    bias: np.ndarray | None = None,
    tile_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Partition a batch of uint8 RGB images (B, H, W, 3); all tiles of all images advance in lockstep.

    bias: optional float32 (B, H, W) maps. Returns float32 geometry (B, T*N, 5) and boxes (B, T*N, 4), tiles
    row-major within each image, exactly as `entropy_partition` would give image by image.
    """
    _check_settings(num_tokens, min_size, weight, tile_size)
    _check_images(images, tile_size)
    batch, height, width = images.shape[:3]
    if bias is not None:
        _check_bias(bias, (batch, height, width))

    kernel = _partition_native.load()
    all_units = _unit_images(images, kernel)
    units = []
    bias_tiles = None if bias is None else []
    for index in range(batch):
        unit = all_units[index]
        for top in range(0, height, tile_size):
            for left in range(0, width, tile_size):
                units.append(unit[top:top + tile_size, left:left + tile_size])
                if bias is not None:
                    # A tile's bias is summed as its own contiguous array, as when the released function is
                    # called on one tile.
                    tile_bias = bias[index, top:top + tile_size, left:left + tile_size]
                    bias_tiles.append(np.ascontiguousarray(tile_bias))

    tile_boxes = _partition_tiles(units, bias_tiles, num_tokens, min_size, float(weight), kernel)
    geometry, boxes = zip(*(_boxes_to_tokens(b, tile_size, tile_size) for b in tile_boxes))
    tiles = len(units) // batch
    geometry = np.stack(geometry).reshape(batch, tiles * num_tokens, 5)
    boxes = np.stack(boxes).reshape(batch, tiles * num_tokens, 4)
    return geometry, boxes

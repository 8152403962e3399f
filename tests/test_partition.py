"""The entropy partition (tokenizer.partition) against the released code's outputs and its own contract."""
from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from tokenizer.partition import (
    Partition,
    bias_from_boxes,
    entropy_partition,
    entropy_partition_batch,
    grey_image,
    max_tokens,
)
from tokenizer import _partition_native
from tokenizer.partition import (
    _BIN_WIDTH,
    _EDGE_MARGIN,
    _ENTROPY_TERMS,
    _KernelScorer,
    _OpenCVScorer,
    _histogram_entropy,
    _make_scorer,
    _unit_images,
)

IMAGES = range(6)
TOKEN_COUNTS = (64, 128, 256)


def _load_baseline():
    """The restatement of the released per-image loop that the benchmark measures against."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "partition.py"
    spec = importlib.util.spec_from_file_location("partition_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


baseline = _load_baseline()


def _kernel():
    """The compiled kernel; the test fails if a C compiler exists but the kernel cannot be built."""
    if not any(shutil.which(name) for name in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler: the partition runs on its OpenCV path only")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel = _partition_native.load()
    assert kernel is not None, "GPSTOKEN_PARTITION_KERNEL=0 is set"
    return kernel


@pytest.fixture(params=["kernel", "opencv"])
def scorer_path(request, monkeypatch):
    """Run a test once on the compiled kernel and once on the OpenCV fallback."""
    if request.param == "kernel":
        _kernel()
    else:
        monkeypatch.setattr(_partition_native, "load", lambda: None)
    return request.param


@pytest.fixture(scope="module")
def fixtures(official_dir):
    with np.load(official_dir / "partition.npz") as data:
        arrays = {key: data[key] for key in data.files}
    meta = json.loads((official_dir / "partition.json").read_text())
    assert (meta["minhw"], meta["weight"]) == (8, 2.5)
    return arrays


def _assert_same(partition_geometry, partition_boxes, fixtures, suffix):
    np.testing.assert_array_equal(partition_geometry, fixtures[f"gpscodes_{suffix}"], strict=True)
    np.testing.assert_array_equal(partition_boxes, fixtures[f"regions_{suffix}"], strict=True)


def _pixel_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Float RoI boxes back to inclusive integer pixel ranges (x0, y0, x1, y1)."""
    scale = np.array([width - 1, height - 1, width - 1, height - 1], np.float64)
    return np.rint((boxes.astype(np.float64) + 1) / 2 * scale).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Bit-for-bit reproduction of the released partitions


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("index", IMAGES)
def test_matches_released_partition(scorer_path, fixtures, index, num_tokens):
    partition = entropy_partition(fixtures[f"image_{index}"], num_tokens)
    _assert_same(partition.geometry, partition.boxes, fixtures, f"{index}_{num_tokens}")
    assert partition.tile_grid == (1, 1) and partition.tiles_per_side == 1


def test_matches_released_partition_with_bias(scorer_path, fixtures):
    partition = entropy_partition(fixtures["image_0"], 128, bias=fixtures["cdbias_0"])
    _assert_same(partition.geometry, partition.boxes, fixtures, "0_128_cdbias")
    # The bias really changes the outcome, so the test above is not passing by accident.
    assert not np.array_equal(partition.boxes, fixtures["regions_0_128"])


def test_matches_released_partition_of_512_image(scorer_path, fixtures):
    partition = entropy_partition(fixtures["image_512"], 128)
    _assert_same(partition.geometry, partition.boxes, fixtures, "512_128")
    assert partition.tiles_per_side == 2 and partition.geometry.shape == (512, 5)


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_batch_matches_released_partitions(scorer_path, fixtures, num_tokens):
    images = np.stack([fixtures[f"image_{index}"] for index in IMAGES])
    geometry, boxes = entropy_partition_batch(images, num_tokens)
    assert geometry.shape == (6, num_tokens, 5) and boxes.shape == (6, num_tokens, 4)
    for index in IMAGES:
        _assert_same(geometry[index], boxes[index], fixtures, f"{index}_{num_tokens}")


def test_batch_with_bias_and_tiles(fixtures):
    """Lockstep over several multi-tile images and per-image biases equals image-by-image calls."""
    images = np.stack([fixtures["image_512"], fixtures["image_512"][::-1].copy()])
    bias = np.stack([np.zeros((512, 512), np.float32), np.tile(fixtures["cdbias_0"], (2, 2))])
    geometry, boxes = entropy_partition_batch(images, 64, bias=bias)
    for index in range(2):
        single = entropy_partition(images[index], 64, bias=bias[index])
        np.testing.assert_array_equal(geometry[index], single.geometry)
        np.testing.assert_array_equal(boxes[index], single.boxes)
    assert not np.array_equal(geometry[0], geometry[1])


# ---------------------------------------------------------------------------------------------------------------
# Agreement with the released algorithm on inputs the fixtures do not cover


def _random_image(rng, height, width):
    """Smooth patches, flat areas and noise: every kind of histogram, and many magnitudes near bin edges."""
    smooth = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3)).astype(np.float64)
    image = np.kron(smooth, np.ones((8, 8, 1)))[:height, :width]
    noise_mask = rng.random((height, width, 1)) < 0.3
    image = np.where(noise_mask, rng.integers(0, 256, (height, width, 3)), image)
    return np.clip(image, 0, 255).astype(np.uint8)


def _random_regions(rng, shapes, count, min_side=1):
    """`count` random regions (tile, y0, y1, x0, x1), inclusive, of tiles of the given shapes."""
    regions = []
    for _ in range(count):
        tile = int(rng.integers(len(shapes)))
        height, width = shapes[tile]
        y0, x0 = int(rng.integers(0, height - min_side + 1)), int(rng.integers(0, width - min_side + 1))
        y1, x1 = int(rng.integers(y0 + min_side - 1, height)), int(rng.integers(x0 + min_side - 1, width))
        regions.append((tile, y0, y1, x0, x1))
    return np.array(regions, np.int32)


@pytest.mark.parametrize("weight", [2.5, 1.0, 0.0, 0.7])
def test_region_scores_equal_released_scores(scorer_path, weight):
    """Both scorers give the released one-region-at-a-time score for regions of all sorts of sizes (thin too)."""
    rng = np.random.default_rng(0)
    greys = [grey_image(_random_image(rng, 96, 80)) for _ in range(3)]
    units = [(grey + 1.0) / 2.0 for grey in greys]
    regions = _random_regions(rng, [(96, 80)] * 3, 200)
    scores = _make_scorer(units, _partition_native.load()).scores(regions, weight)
    for (tile, y0, y1, x0, x1), score in zip(regions.tolist(), scores):
        assert score == baseline.baseline_region_score(greys[tile][y0:y1 + 1, x0:x1 + 1], weight)

def test_kernel_resize_equals_opencv_for_every_region_shape():
    """The kernel's bilinear resize is bit-identical to cv2.resize for all shapes it is given (both sides >= 2)."""
    kernel = _kernel()
    rng = np.random.default_rng(4)
    noise = rng.random((700, 700)).astype(np.float32)
    photo_like = ((rng.integers(0, 256, (700, 700)) / 127.5 - 1).astype(np.float32) + 1.0) / 2.0
    shapes = [(h, w) for h in range(2, 72) for w in range(2, 72)]
    shapes += [(h, w) for h in (64, 128, 129, 256, 257) for w in (2, 63, 64, 65, 128, 256, 300)]
    shapes += [tuple(rng.integers(2, 700, 2)) for _ in range(200)]
    out = np.empty((64, 64), np.float32)
    for index, (height, width) in enumerate(shapes):
        image = (noise, photo_like)[index % 2]
        top, left = rng.integers(0, 701 - height), rng.integers(0, 701 - width)
        region = image[top:top + height, left:left + width]
        kernel.resize64(region.ctypes.data, 700, int(height), int(width), out.ctypes.data)
        assert np.array_equal(out, cv2.resize(region, (64, 64))), (height, width)


def _opencv_numpy_histogram(unit_region: np.ndarray) -> np.ndarray:
    """The released gradient-magnitude histogram (bins 256..511) of one region of a (grey + 1) / 2 tile."""
    small = cv2.resize(unit_region, (64, 64))
    grad_x = cv2.Sobel(small, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    grad_y = cv2.Sobel(small, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    counts, _ = np.histogram(np.sqrt(grad_x**2 + grad_y**2), bins=512, range=(-5.5, 5.5))
    assert not counts[:256].any()
    return counts[256:]


def _kernel_histograms(images, regions):
    counts = np.full((len(regions), 256), -1, np.int64)
    _KernelScorer(images, _kernel()).native_scores(regions, 2.5, counts)
    return counts


def test_kernel_histograms_equal_opencv_and_numpy():
    """Kernel counts == np.histogram of the float64 OpenCV Sobel magnitude, on photo-like and hard regions."""
    rng = np.random.default_rng(5)
    images = [(grey_image(_random_image(rng, 200, 200)) + 1.0) / 2.0 for _ in range(2)]
    images += [
        rng.random((200, 200)).astype(np.float32),
        (np.indices((200, 200)).sum(0) % 2).astype(np.float32),  # the largest gradients
        (rng.random((200, 200)) ** 12).astype(np.float32),  # widely spread exponents
        np.zeros((200, 200), np.float32),
    ]
    regions = _random_regions(rng, [(200, 200)] * len(images), 240, min_side=2)
    counts = _kernel_histograms(images, regions)
    for k, (tile, y0, y1, x0, x1) in enumerate(regions.tolist()):
        assert np.array_equal(counts[k], _opencv_numpy_histogram(images[tile][y0:y1 + 1, x0:x1 + 1])), k


def test_kernel_bins_next_to_bin_edges():
    """Magnitudes at, and a few float32 steps either side of, every bin edge land in numpy's bin.

    A 64x64 region is not resized, so its pixels are chosen directly: a column of value t between columns of 0
    gives the magnitude 4 t (exact in float64) in its two neighbours, with gy = 0 (transposed: gx = 0). Each t is
    j * BIN_WIDTH / 4 (exact in float32) or up to 3 float32 steps away, so these magnitudes are within the
    kernel's float32 margin of an edge and take its exact path.
    """
    targets = [np.float32(j * _BIN_WIDTH / 4) for j in range(1, 187)]
    steps = [t for target in targets for t in _float32_steps(target, 3)]
    images = []
    for start in range(0, len(steps), 16):
        chunk = steps[start:start + 16]
        columns = np.zeros(64, np.float32)
        columns[2::4][:len(chunk)] = chunk
        image = np.tile(columns, (64, 1))
        images += [image, np.ascontiguousarray(image.T)]
    regions = np.array([(tile, 0, 63, 0, 63) for tile in range(len(images))], np.int32)
    counts = _kernel_histograms(images, regions)
    for tile, image in enumerate(images):
        assert np.array_equal(counts[tile], _opencv_numpy_histogram(image)), tile


def _float32_steps(value: np.float32, steps: int) -> list[np.float32]:
    """value and its `steps` float32 neighbours on either side."""
    below, above = [value], [value]
    for _ in range(steps):
        below.append(np.nextafter(below[-1], np.float32(0)))
        above.append(np.nextafter(above[-1], np.float32(1)))
    return below[::-1] + above[1:]


def test_kernel_entropy_sums_in_numpys_pairwise_order():
    """The kernel sums the 256 looked-up terms in numpy's pairwise order: with random terms of wildly different
    sizes and signs (any other order would round differently), it matches np.sum over the 512-bin array."""
    kernel = _kernel()
    rng = np.random.default_rng(9)
    image = (grey_image(_random_image(rng, 256, 256)) + 1.0) / 2.0
    regions = np.array([(0, y, y + 63, x, x + 63) for y in range(0, 193, 64) for x in range(0, 193, 16)], np.int32)
    counts = _kernel_histograms([image], regions)
    scorer = _KernelScorer([image], kernel)
    for _ in range(20):
        terms = rng.standard_normal(4097) * 10.0 ** rng.integers(-12, 12, 4097)
        terms[0] = -0.0  # an empty bin's term, as in every real table
        scores = np.empty(len(regions))
        status = kernel.region_scores(
            len(regions), regions.ctypes.data, scorer.base.ctypes.data, scorer.stride.ctypes.data, terms.ctypes.data,
            1.0, scores.ctypes.data, None,
        )
        assert status == 0
        full = np.concatenate([np.zeros_like(counts), counts], axis=1)
        expected = [-np.sum(terms[row]) * 64 * 64 for row in full]
        assert scores.tolist() == expected


def test_entropy_terms_are_numpys_for_every_count():
    """Exhaustive over the counts a bin can hold (0..4096 of 4096 magnitudes): the term table equals numpy's
    p * log2(p + 1e-10) in released one-histogram arrays, with the count at many different positions."""
    for count in range(4097):
        histogram = np.zeros(512, np.int64)
        histogram[256 + count % 256] = count
        histogram[256 + (count + 97) % 256] += 4096 - count
        prob = histogram / (histogram.sum() + 1e-5)
        assert np.array_equal(prob * np.log2(prob + 1e-10), _ENTROPY_TERMS[histogram]), count


def test_kernel_grey_conversion_equals_numpy_for_every_colour():
    """Exhaustive over all 2^24 RGB colours: the kernel's (grey + 1) / 2 equals the released numpy arithmetic."""
    kernel = _kernel()
    colours = np.arange(2**24, dtype=np.uint32)
    rgb = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=1).astype(np.uint8)
    for chunk in np.split(rgb.reshape(64, 2**18, 3), 64):
        np.testing.assert_array_equal(_unit_images(chunk[:, None], kernel), _unit_images(chunk[:, None], None))


def test_kernel_rejects_values_out_of_range():
    """The kernel's float32 binning is proven for tile values in [0, 1] (it checks |value| <= 1.25)."""
    tile = np.full((64, 64), 0.5, np.float32)
    tile[10, 10] = 1.3
    with pytest.raises(RuntimeError, match="out of range"):
        _KernelScorer([tile], _kernel()).scores(np.array([(0, 0, 63, 0, 63)], np.int32), 2.5)


def test_opencv_path_with_unsure_pixels_only_on_block_borders():
    """Regression: two flat regions whose values differ by a quarter bin width: their only gradients near a bin
    edge are on the replicated borders between their blocks, which are not counted (this used to crash)."""
    flat = np.full((64, 64), 0.25, np.float32)
    tiles = [flat, flat + np.float32(_BIN_WIDTH / 4)]
    counts = _OpenCVScorer(tiles).magnitude_counts(np.array([(0, 0, 63, 0, 63), (1, 0, 63, 0, 63)]))
    assert counts[:, 0].tolist() == [4096, 4096]


# A 32x32 photo crop on which the OpenCV path crashed with 16 tokens and min_size 4 (zlib-compressed uint8 RGB).
_CRASH_CROP = (
    "eNqtk22SgyAMQK8iWrX/amttb7FVu/24/0k2EAiBgGVnd+bNDoTwkuBWDTcVUh2+lAjmgGQi2uY80dF2Oanalkvhx3FK8uvjDKjT"
    "XB1vBG1zZn0lv0360YkLvy3wW0MYh1maYSaqYUGUwW9NIXPLHqnDmkAfoX8FqBb5FQTNEYERNoWW66PhrqEFri2zv+5qWU73RgBB"
    "eqIgOXAG6Fts7VWZfPDj84qjIEKvF9X6CMqjNirtmRn5WRz8TcK3WuSYSt9dQlLvIPx1qqL8KLWtG7Abv4ENfy2IWiJ/Yz1zbgr5"
    "FFgd4TnVyHKONlP7U/3o//DxVo+ukMlsmFmWCHrI+BseGRdN6E+WiAYBuY87uL85rwD56wJ/uijmnx/++nndTXfA+kMzytvzAyn3"
    "+xLOD3A55rQpvNDkBDbhtwmm/yin3STyR850LeYnTzdmS9STR04h/Xgr8sdtl1G7Hw5OqoXTU3cLf5E/+OE6bxI/VkdO4+ffF46I"
    "toDd9YUG7m+ZjTI7N9Sv/M3lyf0R3NMJSvz0ueX4keS//P3lFRk6iLggnBIdY6OEPTV+e9E5ub8XdGX01zc60Y9a7u9TcllLewgT"
    "3E+22+AdLm+gnV5EoT/o2b0DLjb8sC7xyyro3+PjBLzJjPwArWum0w=="
)


def test_small_photo_crop_on_both_paths(scorer_path):
    crop = np.frombuffer(zlib.decompress(base64.b64decode(_CRASH_CROP)), np.uint8).reshape(32, 32, 3)
    boxes = entropy_partition(crop, 16, min_size=4, tile_size=32).boxes
    expected = baseline.baseline_tile_partition(grey_image(crop), 16, 4, 2.5)
    assert [tuple(b) for b in _pixel_boxes(boxes, 32, 32)] == [(x0, y0, x1, y1) for y0, y1, x0, x1 in expected]


def test_kernel_is_cached_and_missing_compiler_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("GPSTOKEN_CACHE", str(tmp_path))
    library = _partition_native.build()
    assert library.parent == tmp_path / "partition" and library.exists()
    modified = library.stat().st_mtime_ns
    assert _partition_native.build() == library and library.stat().st_mtime_ns == modified
    assert [p.name for p in library.parent.iterdir()] == [library.name]  # no temporary file left behind

    monkeypatch.setattr(_partition_native, "_compiler", lambda: "false")  # a "compiler" that always fails
    _partition_native.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="OpenCV/numpy path"):
            assert _partition_native.load() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per process only
            assert _partition_native.load() is None
    finally:
        _partition_native.load.cache_clear()


def test_entropy_of_upper_half_equals_full_histogram():
    """The (K, 256) magnitude counts give the entropy the released (K, 512) histogram gives, bit for bit."""
    rng = np.random.default_rng(8)
    for count in (1, 2, 5, 64):
        upper = np.stack([np.bincount(rng.integers(0, rng.integers(1, 256), 4096), minlength=256) for _ in range(count)])
        full = np.concatenate([np.zeros_like(upper), upper], axis=1)
        prob = full / (full.sum(axis=1, keepdims=True) + 1e-5)
        released = [-np.sum(p * np.log2(p + 1e-10)) for p in prob]
        assert _histogram_entropy(upper).tolist() == released


def test_float32_magnitudes_stay_well_inside_the_edge_margin(fixtures):
    """The fast binning trusts float32 Sobel magnitudes away from bin edges; check the error on hard inputs."""
    rng = np.random.default_rng(3)
    hard = [
        rng.random((64, 64)),  # noise
        np.indices((64, 64)).sum(0) % 2,  # checkerboard: the largest gradients
        rng.random((64, 64)) ** 12,  # tiny values with widely spread exponents
        np.kron(rng.random((8, 8)), np.ones((8, 8))),  # flat patches with steps
    ]
    real = [cv2.resize((grey_image(fixtures[f"image_{i}"]) + 1.0) / 2.0, (64, 64)) for i in IMAGES]
    worst = 0.0
    for unit in [image.astype(np.float32) for image in hard] + real:
        scale = 1.0 / _BIN_WIDTH
        fast = cv2.magnitude(
            cv2.Sobel(unit, cv2.CV_32F, 1, 0, ksize=3, scale=scale, borderType=cv2.BORDER_REPLICATE),
            cv2.Sobel(unit, cv2.CV_32F, 0, 1, ksize=3, scale=scale, borderType=cv2.BORDER_REPLICATE),
        )
        grad_x = cv2.Sobel(unit, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
        grad_y = cv2.Sobel(unit, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
        exact = np.sqrt(grad_x**2 + grad_y**2) * scale
        worst = max(worst, float(np.abs(fast - exact).max()))
    assert worst < _EDGE_MARGIN / 5


@pytest.mark.parametrize(
    "tile_size, min_size, num_tokens, weight",
    [(64, 4, 16, 2.5), (48, 4, 40, 2.5), (40, 3, 25, 1.0), (64, 8, 64, 0.0)],
)
def test_matches_released_loop_on_random_images(scorer_path, tile_size, min_size, num_tokens, weight):
    rng = np.random.default_rng(tile_size + num_tokens)
    images = np.stack([_random_image(rng, tile_size, 2 * tile_size) for _ in range(3)])
    bias = rng.random(images.shape[:3]).astype(np.float32) * 50
    for use_bias in (False, True):
        geometry, boxes = entropy_partition_batch(
            images, num_tokens, min_size=min_size, weight=weight, bias=bias if use_bias else None,
            tile_size=tile_size,
        )
        for index in range(len(images)):
            grey = grey_image(images[index])
            for column in range(2):
                cut = np.s_[:, column * tile_size:(column + 1) * tile_size]
                tile_bias = np.ascontiguousarray(bias[index][cut]) if use_bias else None
                expected = baseline.baseline_tile_partition(grey[cut], num_tokens, min_size, weight, tile_bias)
                got = _pixel_boxes(boxes[index, column * num_tokens:(column + 1) * num_tokens], tile_size, tile_size)
                assert [tuple(b) for b in got] == [(x0, y0, x1, y1) for y0, y1, x0, x1 in expected]


def test_matches_released_loop_on_flat_and_two_tone_images(scorer_path):
    """Flat tiles make every same-sized region tie: the order then rests on the stable-sort rule alone."""
    flat = np.full((64, 64, 3), 90, np.uint8)
    two_tone = flat.copy()
    two_tone[:, 40:] = 200
    for image in (flat, two_tone):
        boxes = entropy_partition(image, 48, min_size=4, tile_size=64).boxes
        expected = baseline.baseline_tile_partition(grey_image(image), 48, 4, 2.5)
        assert [tuple(b) for b in _pixel_boxes(boxes, 64, 64)] == [(x0, y0, x1, y1) for y0, y1, x0, x1 in expected]


# ---------------------------------------------------------------------------------------------------------------
# Contract


def test_regions_tile_the_image_and_geometry_follows_boxes(fixtures):
    partition = entropy_partition(fixtures["image_3"], 256)
    cover = np.zeros((256, 256), np.int64)
    for x0, y0, x1, y1 in _pixel_boxes(partition.boxes, 256, 256):
        cover[y0:y1 + 1, x0:x1 + 1] += 1
    assert (cover == 1).all()
    x0, y0, x1, y1 = partition.boxes.T.astype(np.float64)
    np.testing.assert_allclose(partition.geometry[:, 3], (x0 + x1) / 2, atol=1e-6)
    np.testing.assert_allclose(partition.geometry[:, 4], (y0 + y1) / 2, atol=1e-6)
    assert (partition.geometry[:, 2] == 0).all() and (partition.geometry[:, :2] > 0).all()


def test_max_tokens_and_full_split():
    assert max_tokens(256, 256, 8) == 1024
    assert max_tokens(64, 64, 4) == 256
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    partition = entropy_partition(image, 256, min_size=4, tile_size=64)
    sides = _pixel_boxes(partition.boxes, 64, 64)
    assert ((sides[:, 2] - sides[:, 0] == 3) & (sides[:, 3] - sides[:, 1] == 3)).all()
    with pytest.raises(ValueError, match="larger than a 64x64 tile allows"):
        entropy_partition(image, 257, min_size=4, tile_size=64)


def test_bias_from_boxes_pulls_tokens_into_the_box(fixtures):
    image = fixtures["image_5"]
    box = (160, 16, 240, 96)  # x0, y0, x1, y1, inclusive-exclusive
    bias = bias_from_boxes(256, 256, [(*box, 200.0)])
    assert bias.dtype == np.float32 and bias.sum() == 200.0 * 80 * 80
    assert bias[16, 160] == 200.0 and bias[96, 160] == 0 and bias[16, 240] == 0

    def tokens_inside(partition: Partition) -> int:
        mu = (partition.geometry[:, 3:5].astype(np.float64) + 1) / 2 * 255
        return int(((mu[:, 0] >= box[0]) & (mu[:, 0] < box[2]) & (mu[:, 1] >= box[1]) & (mu[:, 1] < box[3])).sum())

    plain = tokens_inside(entropy_partition(image, 128))
    biased = tokens_inside(entropy_partition(image, 128, bias=bias))
    assert biased > plain + 10


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda img: entropy_partition(img.astype(np.float32), 64), TypeError, "uint8"),
        (lambda img: entropy_partition(img[..., :2], 64), ValueError, r"\(H, W, 3\)"),
        (lambda img: entropy_partition(img[:200], 64), ValueError, "multiples of tile_size=256"),
        (lambda img: entropy_partition(img, 2000), ValueError, "at most 1024"),
        (lambda img: entropy_partition(img, 0), ValueError, "positive integer"),
        (lambda img: entropy_partition(img, 64, min_size=0), ValueError, "min_size"),
        (lambda img: entropy_partition(img, 64, weight=float("nan")), ValueError, "weight"),
        (lambda img: entropy_partition(img[None], 64), ValueError, "one uint8 RGB image"),
        (lambda img: entropy_partition(img, 64, bias=np.zeros((256, 256))), TypeError, "float32"),
        (lambda img: entropy_partition(img, 64, bias=np.zeros((128, 256), np.float32)), ValueError, "shape"),
        (lambda img: entropy_partition(img, 64, bias=np.full((256, 256), np.nan, np.float32)), ValueError, "NaN"),
        (lambda img: bias_from_boxes(256, 256, [(10, 10, 5, 20, 1.0)]), ValueError, "empty or outside"),
        (lambda img: bias_from_boxes(256, 256, [(0, 0, 5, 5)]), ValueError, r"\(x0, y0, x1, y1, weight\)"),
    ],
)
def test_bad_input_is_named(fixtures, call, error, message):
    with pytest.raises(error, match=message):
        call(fixtures["image_0"])


def test_tiles_per_side_needs_a_square_grid():
    image = np.random.default_rng(2).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    partition = entropy_partition(image, 8, min_size=4, tile_size=64)
    assert partition.tile_grid == (1, 2) and partition.geometry.shape == (16, 5)
    with pytest.raises(ValueError, match="not square"):
        partition.tiles_per_side


# ---------------------------------------------------------------------------------------------------------------
# The batched PyTorch partition (tokenizer.partition_torch): CPU here, the same code runs on the GPU


def _partition_agreement(geometry, boxes, expected_geometry, expected_boxes) -> int:
    """0 if identical, else how many tokens' boxes are not among the expected ones (order aside)."""
    if np.array_equal(geometry, expected_geometry) and np.array_equal(boxes, expected_boxes):
        return 0
    expected = set(map(tuple, expected_boxes.tolist()))
    return max(1, sum(tuple(row) not in expected for row in boxes.tolist()))


@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_torch_partition_reproduces_released_partitions(fixtures, num_tokens):
    torch = pytest.importorskip("torch")
    from tokenizer.partition_torch import entropy_partition_torch

    images = torch.from_numpy(np.stack([fixtures[f"image_{index}"] for index in IMAGES]))
    geometry, boxes = entropy_partition_torch(images, num_tokens)
    differences = [
        _partition_agreement(
            geometry[index].numpy(), boxes[index].numpy(),
            fixtures[f"gpscodes_{index}_{num_tokens}"], fixtures[f"regions_{index}_{num_tokens}"],
        )
        for index in IMAGES
    ]
    # Issue 5: at least 99% exact and at most 2 tokens off otherwise; on CPU float64 all of them are exact.
    assert differences == [0] * len(IMAGES)


def test_torch_partition_of_512_image_and_small_tiles(fixtures):
    torch = pytest.importorskip("torch")
    from tokenizer.partition_torch import entropy_partition_torch

    geometry, boxes = entropy_partition_torch(torch.from_numpy(fixtures["image_512"])[None], 128)
    _assert_same(geometry[0].numpy(), boxes[0].numpy(), fixtures, "512_128")

    rng = np.random.default_rng(7)
    images = np.stack([_random_image(rng, 48, 96) for _ in range(3)])
    for num_tokens in (1, 2, 40):
        expected = entropy_partition_batch(images, num_tokens, min_size=4, tile_size=48)
        got = entropy_partition_torch(torch.from_numpy(images), num_tokens, min_size=4, tile_size=48)
        np.testing.assert_array_equal(got[0].numpy(), expected[0])
        np.testing.assert_array_equal(got[1].numpy(), expected[1])
    with pytest.raises(TypeError, match="uint8"):
        entropy_partition_torch(torch.zeros(1, 48, 48, 3), 4, tile_size=48)

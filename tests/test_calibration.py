"""generator.calibration: every calibrated layout is a valid tiling, built by the rule of SPEC.md section 7.

The vectorised implementation is checked against a literal, sequential reading of the rule (a list of regions,
halve the eligible one with most snapped centres, SPEC.md section 3 halving), and the output against the tiling
invariants, on random and adversarial layouts.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from generator.calibration import calibrate_layouts, max_regions, snap_to_grid

GRIDS = [(256, 8), (64, 4), (32, 8), (16, 2), (8, 8), (128, 16)]
MODES = ["uniform", "corner", "duplicates", "outside", "one_cell_each", "clustered"]
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_calibration(centres: np.ndarray, tile: int, min_size: int, num_tokens: int):
    """One layout, sequentially: returns [(x0, y0, x1, y1, count)] in list order (inclusive pixel ranges)."""
    cells = [tuple(c) for c in snap_to_grid(centres, tile, min_size)]

    def count(region):
        x0, y0, x1, y1 = region[:4]
        return sum(x0 <= cx * min_size <= x1 and y0 <= cy * min_size <= y1 for cx, cy in cells)

    # region = (x0, y0, x1, y1, tree index); the tree index only orders ties among equal-size regions.
    regions = [(0, 0, tile - 1, tile - 1, 0)]
    while len(regions) < num_tokens:
        eligible = [r for r in regions if not (r[3] - r[1] <= min_size and r[2] - r[0] <= min_size)]
        assert eligible, "the reference ran out of regions to halve"
        pick = max(eligible, key=lambda r: (count(r), (r[2] - r[0] + 1) * (r[3] - r[1] + 1), -r[4]))
        regions.remove(pick)
        x0, y0, x1, y1, index = pick
        w, h = x1 - x0 + 1, y1 - y0 + 1
        if w >= h:
            regions += [(x0, y0, x0 + w // 2 - 1, y1, 2 * index + 1), (x0 + w // 2, y0, x1, y1, 2 * index + 2)]
        else:
            regions += [(x0, y0, x1, y0 + h // 2 - 1, 2 * index + 1), (x0, y0 + h // 2, x1, y1, 2 * index + 2)]
    return [(*r[:4], count(r)) for r in regions]


def make_layouts(seed: int, mode: str, batch: int, num_tokens: int, tile: int, min_size: int) -> np.ndarray:
    """(batch, num_tokens, 5) predicted geometry; sigma and rho are junk on purpose (calibration ignores them)."""
    rng = np.random.default_rng(seed)
    geometry = rng.normal(size=(batch, num_tokens, 5))
    if mode == "uniform":
        mu = rng.uniform(-1.2, 1.2, size=(batch, num_tokens, 2))
    elif mode == "corner":
        corner = rng.choice([-1.0, 1.0], size=(batch, 1, 2))
        mu = corner - np.sign(corner) * rng.uniform(0, 0.02, size=(batch, num_tokens, 2))
    elif mode == "duplicates":
        points = rng.uniform(-1, 1, size=(batch, 3, 2))
        mu = np.take_along_axis(points, rng.integers(0, 3, size=(batch, num_tokens, 1)), axis=1)
    elif mode == "outside":
        mu = rng.choice([-1e6, -3.0, 1.5, 1e6], size=(batch, num_tokens, 2)) * rng.uniform(0.5, 1, (batch, num_tokens, 2))
    elif mode == "one_cell_each":  # distinct cell centres, as a perfect layout model would give for the finest grid
        grid = tile // min_size
        flat = np.stack([rng.permutation(grid * grid)[:num_tokens] for _ in range(batch)])
        pixels = np.stack([flat % grid, flat // grid], axis=-1) * min_size + (min_size - 1) / 2
        mu = pixels / (tile - 1) * 2 - 1
    else:  # clustered: a few Gaussian blobs
        blobs = rng.uniform(-1, 1, size=(batch, 4, 2))
        which = rng.integers(0, 4, size=(batch, num_tokens))
        mu = np.take_along_axis(blobs, which[..., None], axis=1) + rng.normal(0, 0.05, size=(batch, num_tokens, 2))
    geometry[..., 3:5] = mu
    return geometry


@st.composite
def layout_cases(draw):
    tile, min_size = draw(st.sampled_from(GRIDS))
    limit = max_regions(tile, min_size)
    num_tokens = draw(st.one_of(st.integers(1, min(limit, 8)), st.integers(1, limit), st.just(limit)))
    mode = draw(st.sampled_from(MODES))
    seed = draw(st.integers(0, 2**32 - 1))
    batch = draw(st.integers(1, 4))
    return make_layouts(seed, mode, batch, num_tokens, tile, min_size), tile, min_size


def assert_valid_tiling(result, tile: int, min_size: int, num_tokens: int) -> None:
    ranges = result.ranges
    batch = ranges.shape[0]
    assert ranges.shape == (batch, num_tokens, 4) and result.geometry.shape == (batch, num_tokens, 5)
    assert result.boxes.shape == (batch, num_tokens, 4) and result.counts.shape == (batch, num_tokens)
    assert result.geometry.dtype == np.float32 and result.boxes.dtype == np.float32
    for b in range(batch):
        cover = np.zeros((tile, tile), dtype=np.int64)
        for x0, y0, x1, y1 in ranges[b]:
            assert 0 <= x0 <= x1 < tile and 0 <= y0 <= y1 < tile
            cover[y0:y1 + 1, x0:x1 + 1] += 1
        assert (cover == 1).all(), "regions must be disjoint and cover the tile"
    width = ranges[..., 2] - ranges[..., 0] + 1
    height = ranges[..., 3] - ranges[..., 1] + 1
    assert (width >= min_size).all() and (height >= min_size).all()
    # Section 3 formulas, written out independently of the implementation.
    x0, y0, x1, y1 = np.moveaxis(ranges.astype(np.float64), -1, 0)
    last = tile - 1
    expected = np.stack([(x1 - x0) / tile * 2 / 3, (y1 - y0) / tile * 2 / 3, 0 * x0,
                         (x0 + x1) / last - 1, (y0 + y1) / last - 1], axis=-1)
    np.testing.assert_allclose(result.geometry, expected, atol=1e-6)
    np.testing.assert_allclose(result.boxes, np.stack([x0, y0, x1, y1], -1) / last * 2 - 1, atol=1e-6)
    # geometry consistent with boxes: centre is the box midpoint, sigma two thirds of the box extent (pixels - 1)
    np.testing.assert_allclose(result.geometry[..., 3], (result.boxes[..., 0] + result.boxes[..., 2]) / 2, atol=1e-6)
    np.testing.assert_allclose(result.geometry[..., 4], (result.boxes[..., 1] + result.boxes[..., 3]) / 2, atol=1e-6)
    np.testing.assert_allclose(result.geometry[..., 0], (result.boxes[..., 2] - result.boxes[..., 0]) * last / tile / 3,
                               atol=1e-6)
    assert (result.counts.sum(axis=1) == num_tokens).all()
    np.testing.assert_array_equal(result.exact, (result.counts == 1).all(axis=1))


@FAST
@given(layout_cases())
def test_calibrated_layouts_are_valid_tilings(case):
    geometry, tile, min_size = case
    result = calibrate_layouts(geometry, tile_size=tile, min_size=min_size)
    assert_valid_tiling(result, tile, min_size, geometry.shape[1])


@settings(max_examples=150, deadline=None)
@given(layout_cases())
def test_matches_sequential_reading_of_the_rule(case):
    geometry, tile, min_size = case
    geometry = geometry[:1, :64]  # the reference is slow; one layout, up to 64 tokens
    result = calibrate_layouts(geometry, tile_size=tile, min_size=min_size)
    expected = reference_calibration(geometry[0, :, 3:5], tile, min_size, geometry.shape[1])
    got = [(*r, c) for r, c in zip(result.ranges[0].tolist(), result.counts[0].tolist())]
    assert got == [tuple(e) for e in expected]


@FAST
@given(layout_cases(), st.integers(0, 2**32 - 1))
def test_deterministic_batch_and_permutation_invariant(case, seed):
    geometry, tile, min_size = case
    result = calibrate_layouts(geometry, tile_size=tile, min_size=min_size)
    again = calibrate_layouts(geometry.copy(), tile_size=tile, min_size=min_size)
    for name in ("geometry", "boxes", "ranges", "counts", "exact"):
        np.testing.assert_array_equal(getattr(result, name), getattr(again, name))
    # each layout is calibrated on its own, and only the set of centres matters, not the token order
    rng = np.random.default_rng(seed)
    b = int(rng.integers(geometry.shape[0]))
    shuffled = geometry[b:b + 1, rng.permutation(geometry.shape[1])]
    alone = calibrate_layouts(shuffled, tile_size=tile, min_size=min_size)
    np.testing.assert_array_equal(alone.ranges[0], result.ranges[b])
    np.testing.assert_array_equal(alone.geometry[0], result.geometry[b])


@FAST
@given(layout_cases())
def test_calibrated_layouts_are_fixed_points(case):
    """A valid tiling fed back in is reproduced (as a set of regions) and needs no correction."""
    geometry, tile, min_size = case
    first = calibrate_layouts(geometry, tile_size=tile, min_size=min_size)
    second = calibrate_layouts(first.geometry, tile_size=tile, min_size=min_size)
    assert second.exact.all()
    for b in range(geometry.shape[0]):
        assert sorted(map(tuple, first.ranges[b].tolist())) == sorted(map(tuple, second.ranges[b].tolist()))


def test_one_centre_per_finest_cell_is_exact():
    geometry = make_layouts(0, "one_cell_each", 8, 1024, 256, 8)
    result = calibrate_layouts(geometry)
    assert result.exact.all()
    assert (result.ranges[..., 2] - result.ranges[..., 0] == 7).all()


def test_all_centres_in_one_corner_spread_evenly():
    geometry = np.zeros((1, 16, 5))
    geometry[..., 3:5] = -1.0  # all in the top-left corner cell
    result = calibrate_layouts(geometry, tile_size=64, min_size=4)
    assert_valid_tiling(result, 64, 4, 16)
    assert not result.exact[0]
    # 8 halvings down to the crowded corner cell, then the 7 left go to the largest empty regions: the 32x64 half,
    # then the three 32x32 squares, then three of the seven 16x32 halves: four 16x32 remain, the largest regions.
    np.testing.assert_array_equal(result.ranges[0][result.counts[0] > 0], [[0, 0, 3, 3]])
    assert result.counts[0].max() == 16
    width = result.ranges[0, :, 2] - result.ranges[0, :, 0] + 1
    height = result.ranges[0, :, 3] - result.ranges[0, :, 1] + 1
    assert sorted((width * height).tolist())[-4:] == [16 * 32] * 4
    assert sorted((width * height).tolist())[-5] == 16 * 16


def test_duplicates_and_outside_centres_snap_to_border_cells():
    geometry = np.zeros((1, 4, 5))
    geometry[0, :, 3:5] = [[-5.0, -5.0], [-1.0, -1.0], [1e9, 1e9], [1.0, 1.0]]
    result = calibrate_layouts(geometry, tile_size=64, min_size=4)
    np.testing.assert_array_equal(snap_to_grid(geometry[0, :, 3:5], 64, 4), [[0, 0], [0, 0], [15, 15], [15, 15]])
    assert_valid_tiling(result, 64, 4, 4)
    assert not result.exact[0]
    assert sorted(result.counts[0].tolist()) == [0, 0, 2, 2]


def test_single_token_is_the_whole_tile():
    result = calibrate_layouts(np.zeros((2, 1, 5)))
    np.testing.assert_array_equal(result.ranges, [[[0, 0, 255, 255]]] * 2)
    np.testing.assert_allclose(result.geometry[0, 0], [255 / 256 * 2 / 3, 255 / 256 * 2 / 3, 0, 0, 0], atol=1e-6)
    assert result.exact.all()


def test_region_centres_of_an_x_first_tiling_are_reproduced_exactly():
    # 32x32 tile, min_size 8: x split, y splits -> four 16x16 squares, then the top-left one split along x.
    ranges = np.array([[16, 0, 31, 15], [0, 16, 15, 31], [16, 16, 31, 31], [0, 0, 7, 15], [8, 0, 15, 15]])
    last = 31
    centres = np.stack([(ranges[:, 0] + ranges[:, 2]) / last - 1, (ranges[:, 1] + ranges[:, 3]) / last - 1], -1)
    geometry = np.zeros((1, 5, 5))
    geometry[0, :, 3:5] = centres
    result = calibrate_layouts(geometry, tile_size=32, min_size=8)
    assert result.exact[0]
    assert sorted(map(tuple, result.ranges[0].tolist())) == sorted(map(tuple, ranges.tolist()))


def test_regions_shared_with_the_entropy_partition_have_bit_identical_geometry():
    """Same format as tokenizer.partition: where both produce the same region, geometry and box are identical."""
    partition = pytest.importorskip("tokenizer.partition")
    rng = np.random.default_rng(0)
    images = np.kron(rng.integers(0, 256, (6, 4, 4, 3)), np.ones((1, 16, 16, 1))).astype(np.uint8)
    images[rng.random(images.shape[:3]) < 0.2] = 255
    geometry, boxes = partition.entropy_partition_batch(images, 16, min_size=4, tile_size=64)
    result = calibrate_layouts(geometry, tile_size=64, min_size=4)
    shared = 0
    for b in range(len(images)):
        for i, box in enumerate(result.boxes[b]):
            match = np.flatnonzero((boxes[b] == box).all(axis=1))
            if match.size:
                shared += 1
                np.testing.assert_array_equal(result.geometry[b, i], geometry[b, match[0]])
    assert shared > 0


def test_accepts_torch_tensors_and_extra_columns():
    geometry = make_layouts(1, "uniform", 3, 128, 256, 8)
    wide = np.concatenate([geometry, np.ones((3, 128, 16))], axis=-1)
    from_numpy = calibrate_layouts(geometry)
    from_torch = calibrate_layouts(torch.from_numpy(wide).float())
    np.testing.assert_array_equal(from_numpy.ranges, from_torch.ranges)
    assert calibrate_layouts(torch.from_numpy(geometry).bfloat16()).geometry.shape == (3, 128, 5)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(GRIDS), st.lists(st.floats(-1.5, 1.5), min_size=2, max_size=2))
def test_snapping_picks_the_nearest_cell_centre(grid, centre):
    tile, min_size = grid
    cell = snap_to_grid(np.array(centre), tile, min_size)
    pixel = (np.clip(centre, -1, 1) + 1) / 2 * (tile - 1)
    centres = np.arange(tile // min_size) * min_size + (min_size - 1) / 2
    for axis in range(2):
        distances = np.abs(centres - pixel[axis])
        assert distances[cell[axis]] <= distances.min() + 1e-9


def test_midway_centre_goes_to_the_higher_cell():
    midway = 7.5 / 255 * 2 - 1  # pixel 7.5: between the centres of cells 0 (3.5) and 1 (11.5)
    np.testing.assert_array_equal(snap_to_grid(np.array([midway, midway]), 256, 8), [1, 1])


@pytest.mark.parametrize("tile, min_size, num_tokens", [(256, 8, 1025), (64, 4, 257), (8, 8, 2), (256, 8, 0)])
def test_token_count_outside_what_the_tile_allows(tile, min_size, num_tokens):
    with pytest.raises(ValueError, match=rf"N={num_tokens} tokens cannot tile"):
        calibrate_layouts(np.zeros((1, num_tokens, 5)), tile_size=tile, min_size=min_size)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_centres(value):
    geometry = np.zeros((3, 4, 5))
    geometry[2, 1, 4] = value
    with pytest.raises(ValueError, match="1 layout.*NaN or infinite centres, first at batch index 2"):
        calibrate_layouts(geometry, tile_size=64, min_size=4)


def test_non_finite_sigma_is_ignored():
    geometry = np.zeros((1, 4, 5))
    geometry[..., :3] = np.nan  # only the centres are used
    assert calibrate_layouts(geometry, tile_size=64, min_size=4).exact.shape == (1,)


@pytest.mark.parametrize("shape", [(4, 5), (1, 4, 4), (1, 1, 4, 5)])
def test_wrong_shapes(shape):
    with pytest.raises(ValueError, match=r"shape \(B, N, >=5\)"):
        calibrate_layouts(np.zeros(shape))


@pytest.mark.parametrize("tile, min_size", [(256, 1), (24, 8), (100, 8), (4, 8), (256, 0)])
def test_grids_that_halving_cannot_respect(tile, min_size):
    with pytest.raises(ValueError, match="min_size"):
        calibrate_layouts(np.zeros((1, 1, 5)), tile_size=tile, min_size=min_size)


def test_non_integer_grid_parameters():
    with pytest.raises(TypeError, match="tile_size must be an int"):
        calibrate_layouts(np.zeros((1, 1, 5)), tile_size=256.0)

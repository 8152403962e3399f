"""generator.calibration: every calibrated layout is a valid tiling, built by the rule of SPEC.md section 7.

The vectorised implementation is checked against a literal, sequential reading of the rule (a list of regions,
halve the eligible one with most snapped centres, SPEC.md section 3 halving, y for a square with a centre on its x
split line), the output against the tiling invariants on random and adversarial layouts, and real partitions
(the released fixtures, entropy partitions of synthetic images, random halving tilings) against exact recovery.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from generator.calibration import calibrate_layouts, max_regions, snap_centres

GRIDS = [(256, 8), (64, 4), (32, 8), (16, 2), (8, 8), (128, 16)]
MODES = ["uniform", "corner", "duplicates", "outside", "one_cell_each", "clustered"]
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def possible_centres(tile: int, min_size: int) -> np.ndarray:
    """Pixel centres of every interval the halving can make on one axis, by enumeration."""
    sizes = [tile >> k for k in range(tile.bit_length()) if tile >> k >= min_size]
    return np.unique([a + (s - 1) / 2 for s in sizes for a in range(0, tile, s)])


def reference_snap(mu: float, tile: int, min_size: int) -> float:
    """Nearest possible region centre (pixels) to ``mu``; midway goes to the higher one."""
    pixel = (mu + 1) / 2 * (tile - 1)
    centres = possible_centres(tile, min_size)
    distances = np.abs(centres - pixel)
    return float(centres[np.flatnonzero(distances <= distances.min() + 1e-9)[-1]])


def reference_calibration(centres: np.ndarray, tile: int, min_size: int, num_tokens: int):
    """One layout, sequentially: returns [(x0, y0, x1, y1, count)] in list order (inclusive pixel ranges)."""
    points = [(reference_snap(x, tile, min_size), reference_snap(y, tile, min_size)) for x, y in centres]

    def inside(region, point):  # a point on a boundary belongs to the region right of / below it
        x0, y0, x1, y1 = region[:4]
        return x0 - 0.5 <= point[0] < x1 + 0.5 and y0 - 0.5 <= point[1] < y1 + 0.5

    def count(region):
        return sum(inside(region, p) for p in points)

    # region = (x0, y0, x1, y1, tree index); the tree index only orders ties among equal-size regions.
    regions = [(0, 0, tile - 1, tile - 1, 0)]
    while len(regions) < num_tokens:
        eligible = [r for r in regions if not (r[3] - r[1] <= min_size and r[2] - r[0] <= min_size)]
        assert eligible, "the reference ran out of regions to halve"
        pick = max(eligible, key=lambda r: (count(r), (r[2] - r[0] + 1) * (r[3] - r[1] + 1), -r[4]))
        regions.remove(pick)
        x0, y0, x1, y1, index = pick
        w, h = x1 - x0 + 1, y1 - y0 + 1
        x_line = x0 + w // 2 - 0.5
        on_line = any(inside(pick, p) and p[0] == x_line for p in points)
        if w > h or (w == h and not on_line):
            regions += [(x0, y0, x0 + w // 2 - 1, y1, 2 * index + 1), (x0 + w // 2, y0, x1, y1, 2 * index + 2)]
        else:
            regions += [(x0, y0, x1, y0 + h // 2 - 1, 2 * index + 1), (x0, y0 + h // 2, x1, y1, 2 * index + 2)]
    return [(*r[:4], count(r)) for r in regions]


def region_centres(ranges: np.ndarray, tile: int) -> np.ndarray:
    """(..., 4) inclusive pixel ranges -> (..., 2) centres in [-1, 1] (SPEC.md section 3)."""
    ranges = np.asarray(ranges, dtype=np.float64)
    return np.stack([ranges[..., 0] + ranges[..., 2], ranges[..., 1] + ranges[..., 3]], -1) / (tile - 1) - 1


def random_halving_tiling(rng, tile: int, min_size: int, num_tokens: int) -> np.ndarray:
    """A tiling made by halving random regions (squares either way, by a coin): (num_tokens, 4) pixel ranges."""
    regions = [(0, 0, tile - 1, tile - 1)]
    while len(regions) < num_tokens:
        eligible = [i for i, r in enumerate(regions) if r[2] - r[0] + 1 > min_size or r[3] - r[1] + 1 > min_size]
        x0, y0, x1, y1 = regions.pop(eligible[rng.integers(len(eligible))])
        w, h = x1 - x0 + 1, y1 - y0 + 1
        if w > h or (w == h and rng.random() < 0.5):
            regions += [(x0, y0, x0 + w // 2 - 1, y1), (x0 + w // 2, y0, x1, y1)]
        else:
            regions += [(x0, y0, x1, y0 + h // 2 - 1), (x0, y0 + h // 2, x1, y1)]
    return np.array(regions)


def assert_same_regions(got: np.ndarray, expected: np.ndarray) -> None:
    assert sorted(map(tuple, np.asarray(got).tolist())) == sorted(map(tuple, np.asarray(expected).tolist()))


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
        scale = rng.uniform(0.5, 1, (batch, num_tokens, 2))
        mu = rng.choice([-1e6, -3.0, 1.5, 1e6], size=(batch, num_tokens, 2)) * scale
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


def assert_valid_tiling(result, tile: int, min_size: int, num_tokens: int, snapped=None) -> None:
    """The tiling invariants; with ``snapped`` (B, N, 2) lattice indices, also the meaning of ``exact``."""
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
    assert (result.counts[result.exact] == 1).all(), "exact layouts have one snapped centre per region"
    if snapped is not None:  # exact: the region centres are the snapped centres, as multisets
        lattice = np.rint((np.moveaxis(ranges[..., :2] + ranges[..., 2:], -1, 0) + 1) / min_size).astype(np.int64)
        np.testing.assert_array_equal(
            result.exact, [sorted(zip(*lattice[:, b].tolist())) == sorted(map(tuple, snapped[b].tolist()))
                           for b in range(batch)])


@FAST
@given(layout_cases())
def test_calibrated_layouts_are_valid_tilings(case):
    geometry, tile, min_size = case
    result = calibrate_layouts(geometry, tile_size=tile, min_size=min_size)
    snapped = snap_centres(geometry[..., 3:5], tile, min_size)
    assert_valid_tiling(result, tile, min_size, geometry.shape[1], snapped)


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
    # lattice 1 and 31 are pixels 1.5 and 61.5, the centres of the corner cells
    np.testing.assert_array_equal(snap_centres(geometry[0, :, 3:5], 64, 4), [[1, 1], [1, 1], [31, 31], [31, 31]])
    assert_valid_tiling(result, 64, 4, 4)
    assert not result.exact[0]
    assert sorted(result.counts[0].tolist()) == [0, 0, 2, 2]


def test_single_token_is_the_whole_tile():
    result = calibrate_layouts(np.zeros((2, 1, 5)))
    np.testing.assert_array_equal(result.ranges, [[[0, 0, 255, 255]]] * 2)
    np.testing.assert_allclose(result.geometry[0, 0], [255 / 256 * 2 / 3, 255 / 256 * 2 / 3, 0, 0, 0], atol=1e-6)
    assert result.exact.all()


@pytest.mark.parametrize("ranges", [
    # x split, y splits -> four 16x16 squares, then the top-left one split along x
    [[16, 0, 31, 15], [0, 16, 15, 31], [16, 16, 31, 31], [0, 0, 7, 15], [8, 0, 15, 15]],
    # y split (top and bottom full width), then the top half along x: only a y-first rule gets this
    [[0, 16, 31, 31], [0, 0, 15, 15], [16, 0, 31, 15]],
    # y split, both halves along x, then one quarter along y: the quarters are also those of an x split
    [[0, 0, 15, 15], [16, 0, 31, 15], [0, 16, 15, 31], [16, 16, 31, 23], [16, 24, 31, 31]],
    [[0, 0, 31, 15], [0, 16, 31, 31]],
])
def test_hand_made_tilings_are_reproduced_exactly(ranges):
    ranges = np.array(ranges)
    geometry = np.zeros((1, len(ranges), 5))
    geometry[0, :, 3:5] = region_centres(ranges, 32)
    result = calibrate_layouts(geometry, tile_size=32, min_size=8)
    assert result.exact[0]
    assert_same_regions(result.ranges[0], ranges)


def test_centre_on_the_split_line_of_a_square_makes_it_split_along_y():
    # one centre at the tile centre (pixel 15.5: on the x split line), one inside the top-left cell
    geometry = np.zeros((1, 2, 5))
    geometry[0, :, 3:5] = [[0.0, 0.0], [-0.9, -0.9]]
    result = calibrate_layouts(geometry, tile_size=32, min_size=8)
    assert_same_regions(result.ranges[0], [[0, 0, 31, 15], [0, 16, 31, 31]])
    # the tile centre sits on the boundary between the halves and counts toward the lower (higher y) one
    np.testing.assert_array_equal(result.counts[0], [1, 1])
    assert not result.exact[0]  # the snapped centres are not those of the two halves


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(GRIDS), st.integers(0, 2**32 - 1), st.data())
def test_any_halving_tiling_is_reproduced_exactly(grid, seed, data):
    """Squares split either way (a coin), regions picked at random: the tiling comes back, flagged exact."""
    tile, min_size = grid
    num_tokens = data.draw(st.integers(1, max_regions(tile, min_size)))
    rng = np.random.default_rng(seed)
    tilings = [random_halving_tiling(rng, tile, min_size, num_tokens) for _ in range(3)]
    geometry = np.zeros((3, num_tokens, 5))
    geometry[..., 3:5] = region_centres(np.stack(tilings), tile)
    # float32, as a model would output, and in a random token order
    geometry = geometry[:, rng.permutation(num_tokens)].astype(np.float32)
    result = calibrate_layouts(geometry, tile_size=tile, min_size=min_size)
    assert result.exact.all()
    for b, tiling in enumerate(tilings):
        assert_same_regions(result.ranges[b], tiling)


def fixture_partitions(official_dir: Path):
    """(name, geometry (T, N, 5), boxes (T, N, 4)) of every released fixture partition, one entry per tile."""
    with np.load(official_dir / "partition.npz") as fixtures:
        for name in sorted(k for k in fixtures.files if k.startswith("gpscodes_")):
            tiles = 4 if name.startswith("gpscodes_512_") else 1
            geometry = fixtures[name].reshape(tiles, -1, 5)
            boxes = fixtures[name.replace("gpscodes_", "regions_")].reshape(tiles, -1, 4)
            yield name, geometry, boxes


def test_released_fixture_partitions_are_reproduced_exactly(official_dir):
    """64/128/256 tokens of six photos, the bias case and each tile of the 512 case: same regions, bit for bit."""
    names = []
    for name, geometry, boxes in fixture_partitions(official_dir):
        result = calibrate_layouts(geometry)
        assert result.exact.all(), name
        for tile in range(len(geometry)):
            order = [np.flatnonzero((boxes[tile] == box).all(axis=1)) for box in result.boxes[tile]]
            assert all(match.size == 1 for match in order), f"{name} tile {tile}: regions differ"
            order = np.concatenate(order)
            assert sorted(order.tolist()) == list(range(len(order)))
            np.testing.assert_array_equal(result.geometry[tile], geometry[tile, order, :5])
        names.append(name)
    assert len(names) == 20 and any("512" in n for n in names) and any("cdbias" in n for n in names)


@pytest.mark.parametrize("tile, min_size, num_tokens", [(64, 4, 16), (64, 4, 100), (256, 8, 128)])
def test_entropy_partitions_of_synthetic_images_are_reproduced_exactly(tile, min_size, num_tokens):
    """Same format as tokenizer.partition: every region comes back with bit-identical geometry and box."""
    partition = pytest.importorskip("tokenizer.partition")
    rng = np.random.default_rng(num_tokens)
    blocks = tile // 16
    images = np.kron(rng.integers(0, 256, (6, blocks, blocks, 3)), np.ones((1, 16, 16, 1))).astype(np.uint8)
    images[rng.random(images.shape[:3]) < 0.2] = 255
    geometry, boxes = partition.entropy_partition_batch(images, num_tokens, min_size=min_size, tile_size=tile)
    result = calibrate_layouts(geometry, tile_size=tile, min_size=min_size)
    assert result.exact.all()
    for b in range(len(images)):
        assert_same_regions(result.boxes[b], boxes[b])
        for i, box in enumerate(result.boxes[b]):
            np.testing.assert_array_equal(result.geometry[b, i], geometry[b, (boxes[b] == box).all(axis=1)][0])


def test_accepts_torch_tensors_and_extra_columns():
    geometry = make_layouts(1, "uniform", 3, 128, 256, 8)
    wide = np.concatenate([geometry, np.ones((3, 128, 16))], axis=-1)
    from_numpy = calibrate_layouts(geometry)
    from_torch = calibrate_layouts(torch.from_numpy(wide).float())
    np.testing.assert_array_equal(from_numpy.ranges, from_torch.ranges)
    assert calibrate_layouts(torch.from_numpy(geometry).bfloat16()).geometry.shape == (3, 128, 5)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(GRIDS), st.lists(st.floats(-1.5, 1.5), min_size=2, max_size=2))
def test_snapping_picks_the_nearest_possible_region_centre(grid, centre):
    tile, min_size = grid
    lattice = snap_centres(np.array(centre), tile, min_size)
    for axis in range(2):
        assert lattice[axis] * min_size / 2 - 0.5 == reference_snap(centre[axis], tile, min_size)


def test_midway_centre_goes_to_the_higher_lattice_point():
    midway = 21.5 / 255 * 2 - 1  # pixel 21.5: between the possible centres 19.5 (lattice 5) and 23.5 (lattice 6)
    assert (midway + 1) / 2 * 255 >= 21.5  # no rounding below the midpoint (5.5 or 9.5 would round down)
    np.testing.assert_array_equal(snap_centres(np.array([midway, midway]), 256, 8), [6, 6])
    assert reference_snap(midway, 256, 8) == 23.5


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

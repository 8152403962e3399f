"""eval.layout: layout statistics, the per-class Frechet distance report and its CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from eval.layout import layout_features, layout_report, main
from generator.calibration import calibrate_layouts

TILE, MIN_SIZE, TOKENS = 64, 4, 32


def sample_layouts(seed: int, labels: np.ndarray, spread: float = 0.25, shift: float = 0.0) -> np.ndarray:
    """Valid tilings whose detail sits around a class-dependent spot: centres ~ N(spot + shift, spread)."""
    rng = np.random.default_rng(seed)
    spots = np.array([[-0.5, -0.5], [0.5, 0.3], [0.0, 0.6]])
    geometry = np.zeros((len(labels), TOKENS, 5))
    geometry[..., 3:5] = spots[labels][:, None] + shift + rng.normal(0, spread, size=(len(labels), TOKENS, 2))
    return calibrate_layouts(geometry, tile_size=TILE, min_size=MIN_SIZE).geometry


@pytest.fixture(scope="module")
def labels():
    return np.repeat(np.arange(3), 200)


def test_features_are_fractions_of_tokens():
    geometry = calibrate_layouts(np.random.default_rng(0).uniform(-1, 1, (5, 128, 5))).geometry
    features = layout_features(geometry, grid=4, size_bins=8)
    assert features.shape == (5, 16 + 8 + 3)
    for block in (features[:, :16], features[:, 16:24], features[:, 24:]):
        np.testing.assert_allclose(block.sum(axis=1), 1.0)
    # the tokens of an 8x8 grid of 32-pixel squares: 4 per coarse cell, all of one size, all square
    ranges = np.array([(x, y, x + 31, y + 31) for y in range(0, 256, 32) for x in range(0, 256, 32)], float)
    grid_layout = np.zeros((1, 64, 5))
    grid_layout[0, :, 0] = grid_layout[0, :, 1] = 31 / 256 * 2 / 3
    grid_layout[0, :, 3] = (ranges[:, 0] + ranges[:, 2]) / 255 - 1
    grid_layout[0, :, 4] = (ranges[:, 1] + ranges[:, 3]) / 255 - 1
    features = layout_features(grid_layout)
    np.testing.assert_allclose(features[0, :16], 1 / 16)
    assert np.count_nonzero(features[0, 16:24]) == 1
    np.testing.assert_allclose(features[0, 24:], [0, 1, 0])


def test_features_do_not_depend_on_token_order():
    geometry = sample_layouts(1, np.zeros(4, dtype=np.int64))
    shuffled = geometry[:, np.random.default_rng(2).permutation(TOKENS)]
    np.testing.assert_array_equal(layout_features(geometry), layout_features(shuffled))


def test_identical_sets_have_zero_distance(labels):
    real = sample_layouts(0, labels)
    report = layout_report(real, real, labels, labels, tile_size=TILE, min_size=MIN_SIZE)
    assert abs(report["frechet_distance"]) < 1e-8
    assert all(abs(d) < 1e-8 for d in report["frechet_distance_per_class"].values())
    # valid tilings need no correction: calibration gives back the same regions
    assert report["exact_fraction"] == 1.0
    assert report["classes_skipped"] == [] and report["num_generated"] == report["num_real"] == 600


def test_perturbed_layouts_are_farther_than_a_resample_of_the_real_set(labels):
    real = sample_layouts(0, labels)
    resampled = sample_layouts(1, labels)  # same distribution, new draw
    rng = np.random.default_rng(3)
    bootstrap = rng.integers(0, len(labels), len(labels))
    options = dict(calibrate=False, tile_size=TILE, min_size=MIN_SIZE)
    baseline = layout_report(resampled, real, labels, labels, **options)
    boot = layout_report(real[bootstrap], real, labels[bootstrap], labels, **options)
    for perturbed in (sample_layouts(1, labels, shift=0.3),  # detail moved
                      sample_layouts(1, labels, spread=0.6),  # detail spread out
                      sample_layouts(1, (labels + 1) % 3)):  # right layouts, wrong classes
        report = layout_report(perturbed, real, labels, labels, **options)
        assert report["frechet_distance_class_mean"] > 2 * max(baseline["frechet_distance_class_mean"],
                                                               boot["frechet_distance_class_mean"])
        for label, distance in report["frechet_distance_per_class"].items():
            assert distance > baseline["frechet_distance_per_class"][label]


def test_raw_layouts_are_calibrated_and_counted(labels):
    rng = np.random.default_rng(4)
    raw = rng.uniform(-1, 1, (len(labels), TOKENS, 5))
    # class 2: centres of valid tilings, jittered by up to a pixel: each still snaps inside its own region
    tilings = sample_layouts(6, labels[labels == 2])
    raw[labels == 2, :, 3:5] = tilings[..., 3:5] + rng.uniform(-1, 1, tilings[..., 3:5].shape) / (TILE - 1)
    report = layout_report(raw, sample_layouts(0, labels), labels, labels, tile_size=TILE, min_size=MIN_SIZE)
    expected = calibrate_layouts(raw, tile_size=TILE, min_size=MIN_SIZE).exact
    assert report["exact_fraction"] == pytest.approx(expected.mean())
    assert report["exact_fraction_per_class"]["2"] == 1.0
    assert report["exact_fraction_per_class"]["0"] < 0.5


def test_classes_missing_on_one_side_are_skipped():
    real_labels = np.array([0] * 10 + [1] * 10 + [2])
    gen_labels = np.array([0] * 10 + [3] * 5)
    report = layout_report(sample_layouts(0, gen_labels % 3), sample_layouts(1, real_labels), gen_labels,
                           real_labels, calibrate=False)
    assert list(report["frechet_distance_per_class"]) == ["0"]
    assert report["classes_skipped"] == [1, 2, 3]


def test_bad_inputs_are_named():
    good = sample_layouts(0, np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="labels_gen must be 4 integer class ids"):
        layout_report(good, good, np.zeros(3, dtype=np.int64), np.zeros(4, dtype=np.int64), calibrate=False)
    with pytest.raises(ValueError, match="labels_real must be 4 integer class ids"):
        layout_report(good, good, np.zeros(4, dtype=np.int64), np.zeros(4), calibrate=False)
    with pytest.raises(ValueError, match="sigma must be positive"):
        layout_features(-good)
    with pytest.raises(ValueError, match="shape"):
        layout_features(good[0])
    nan = good.copy()
    nan[0, 0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        layout_features(nan)
    with pytest.raises(ValueError, match="NaN or infinite centres"):
        layout_report(nan, good, np.zeros(4, dtype=np.int64), np.zeros(4, dtype=np.int64))


def test_cli_writes_the_same_report(tmp_path, labels, capsys):
    real = sample_layouts(0, labels)
    raw = np.random.default_rng(5).uniform(-1, 1, (len(labels), TOKENS, 5))
    np.savez(tmp_path / "gen.npz", geometry=raw, labels=labels)
    np.savez(tmp_path / "real.npz", geometry=real, labels=labels)
    out = tmp_path / "report.json"
    report = main([str(tmp_path / "gen.npz"), str(tmp_path / "real.npz"), "--tile-size", str(TILE),
                   "--min-size", str(MIN_SIZE), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out) == report
    assert report == layout_report(raw, real, labels, labels, tile_size=TILE, min_size=MIN_SIZE)
    np.savez(tmp_path / "bad.npz", layouts=real)
    with pytest.raises(SystemExit, match="missing array"):
        main([str(tmp_path / "bad.npz"), str(tmp_path / "real.npz")])

"""The partition demo: the Gaussian mosaic is a weighted average of region colours, and the job writes its page."""
from __future__ import annotations

import numpy as np

from tokenizer.demo import gaussian_mosaic, region_mean_colours, run_demo
from tokenizer.partition import entropy_partition


def test_mosaic_of_a_flat_image_is_that_colour():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:] = (200, 40, 90)
    part = entropy_partition(image, 16, min_size=4, tile_size=64)
    assert np.allclose(region_mean_colours(image, part.boxes), np.array([200, 40, 90]) / 127.5 - 1, atol=1e-6)
    assert np.abs(gaussian_mosaic(image, part.geometry, part.boxes).astype(int) - image).max() <= 1


def test_demo_writes_pictures_and_index(tmp_path):
    summary = run_demo(tmp_path, token_counts=(16,))
    assert (tmp_path / "index.html").is_file()
    for name in summary:
        assert (tmp_path / f"{name}.png").is_file()
        assert 0 < summary[name][16]["smallest_sigma"] <= summary[name][16]["largest_sigma"] < 1

"""Image reading, conversion of every PIL mode we promise, fitting to tiles, and token overlays."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tokenizer.images import (ImageReadError, collect_images, fit_to_tiles, read_image, to_tensor, to_uint8)
from tokenizer.viz import draw_tokens, ellipse_polygon, image_grid, size_colours


@pytest.fixture
def photo() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()[:96, :128]


def test_rgb_roundtrip(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), photo)


def test_grey_rgba_palette_16bit(tmp_path, photo):
    grey = photo[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    out = read_image(tmp_path / "grey.png")
    assert out.shape == photo.shape and np.array_equal(out[..., 1], grey)

    rgba = np.concatenate([photo, np.full(photo.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png"), photo)  # alpha dropped, colour kept

    pal = Image.fromarray(photo).quantize(colors=16)
    pal.save(tmp_path / "pal.png")
    expected = np.asarray(pal.convert("RGB"))
    assert np.array_equal(read_image(tmp_path / "pal.png"), expected)

    wide = (grey.astype(np.uint16) << 8) | 0xAB
    Image.fromarray(wide).save(tmp_path / "deep.png")
    out16 = read_image(tmp_path / "deep.png")
    assert out16.dtype == np.uint8 and np.array_equal(out16[..., 2], grey)


def test_truncated_and_garbage_files_raise_naming_the_file(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.png").write_bytes(b"this is not a png")
    for name in ("cut.jpg", "noise.png", "missing.png"):
        with pytest.raises(ImageReadError, match=name):
            read_image(tmp_path / name)


def test_collect_images_skips_non_images(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(photo).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "notes.md").write_text("hello")
    images, skipped = collect_images([str(tmp_path)])
    assert [p.name for p in images] == ["a.png", "b.jpg"]
    assert [p.name for p in skipped] == ["notes.md"]
    listed = tmp_path / "list.txt"
    listed.write_text("a.png\nsub/b.jpg\n")
    assert [p.name for p in collect_images(str(listed))[0]] == ["a.png", "b.jpg"]
    assert [p.name for p in collect_images(str(tmp_path / "*.png"))[0]] == ["a.png"]
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        collect_images(str(tmp_path / "nothing_here"))


def test_fit_to_tiles_policies(photo):
    tall = np.zeros((700, 300, 3), np.uint8)
    assert fit_to_tiles(tall, 256).shape == (512, 256, 3)     # 300 -> 256, 700 -> 597 -> crop 512
    assert fit_to_tiles(tall, 256, policy="resize").shape == (768, 256, 3)
    small = photo  # 96 x 128: smaller than a tile is scaled up to one tile
    assert fit_to_tiles(small, 256).shape == (256, 256, 3)
    with pytest.raises(ValueError, match="not a whole number"):
        fit_to_tiles(small, 256, policy="none")
    big = np.zeros((1100, 1100, 3), np.uint8)
    assert fit_to_tiles(big, 256, max_tiles=2).shape == (512, 512, 3)


def test_tensor_conversion_matches_release_convention(photo):
    x = to_tensor(photo)
    assert x.shape == (3, 96, 128)
    assert np.allclose(x.numpy(), photo.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)
    assert np.array_equal(to_uint8(x), photo)


def test_ellipse_points_lie_on_the_k_sigma_contour():
    rng = np.random.default_rng(0)
    for _ in range(20):
        sx, sy = rng.uniform(0.02, 0.5, 2)
        rho = rng.uniform(-0.95, 0.95)
        mx, my = rng.uniform(-1, 1, 2)
        h, w = 64, 96
        pts = np.array(ellipse_polygon(np.array([sx, sy, rho, mx, my]), 2.0, h, w))
        dx = pts[:, 0] * 2 / (w - 1) - 1 - mx
        dy = pts[:, 1] * 2 / (h - 1) - 1 - my
        cov = np.array([[sx * sx, rho * sx * sy], [rho * sx * sy, sy * sy]])
        d = np.stack([dx, dy], 1)
        mahalanobis = np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d)
        assert np.allclose(mahalanobis, 4.0, rtol=1e-9)


def test_overlay_and_grid_shapes(photo):
    geometry = np.array([[0.1, 0.2, 0.3, 0.0, 0.0], [0.02, 0.02, 0.0, 0.5, 0.5]])
    over = draw_tokens(photo, geometry, scale=2)
    assert over.shape == (192, 256, 3) and not np.array_equal(over[::2, ::2], photo)
    colours = size_colours(geometry)
    assert not np.array_equal(colours[0], colours[1])
    grid = image_grid([[photo, photo], [photo]], pad=2)
    assert grid.shape == (96 * 2 + 6, 128 * 2 + 6, 3)

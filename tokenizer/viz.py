"""Pictures of GPS-tokens: each Gaussian drawn as its 1- and 2-sigma ellipse over the image, and image grids.

Geometry is in the normalised align-corners frame of SPEC.md section 1: x = 2 j / (W - 1) - 1 for column j, so a
length of 1 in normalised units is (W - 1) / 2 pixels. The covariance of a token is
[[sx^2, rho sx sy], [rho sx sy, sy^2]]; its k-sigma ellipse is mu + k L [cos t, sin t] with L L^T = covariance.
Ellipses are coloured by token size (log of sx * sy): small tokens warm, large tokens cool.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

# Anchor colours from small to large tokens (a perceptually ordered ramp: yellow, orange, magenta, violet, blue).
_SIZE_RAMP = np.array([[255, 230, 40], [255, 140, 20], [230, 40, 120], [140, 40, 200], [40, 90, 230]], dtype=np.float64)
_ELLIPSE_POINTS = 48


def size_colours(geometry: np.ndarray) -> np.ndarray:
    """One RGB colour per token from the log of its area, spread over the range present in `geometry`."""
    log_area = np.log(np.clip(geometry[:, 0] * geometry[:, 1], 1e-12, None))
    span = log_area.max() - log_area.min()
    position = (log_area - log_area.min()) / span if span > 0 else np.zeros_like(log_area)
    scaled = position * (len(_SIZE_RAMP) - 1)
    low = np.floor(scaled).astype(int).clip(0, len(_SIZE_RAMP) - 2)
    frac = (scaled - low)[:, None]
    return ((1 - frac) * _SIZE_RAMP[low] + frac * _SIZE_RAMP[low + 1]).round().astype(np.uint8)


def ellipse_polygon(token: np.ndarray, k: float, height: int, width: int) -> list[tuple[float, float]]:
    """Pixel-space polygon of the k-sigma ellipse of one token (sigma_x, sigma_y, rho, mu_x, mu_y, ...)."""
    sx, sy, rho, mx, my = (float(v) for v in token[:5])
    rho = float(np.clip(rho, -0.999999, 0.999999))
    # Cholesky factor of the covariance, then to pixels (x and y scale separately on non-square images).
    chol = np.array([[sx, 0.0], [rho * sy, sy * np.sqrt(1.0 - rho * rho)]])
    angles = np.linspace(0.0, 2.0 * np.pi, _ELLIPSE_POINTS, endpoint=False)
    circle = np.stack([np.cos(angles), np.sin(angles)])
    points = np.array([[mx], [my]]) + k * chol @ circle
    px = (points[0] + 1.0) * (width - 1) / 2.0
    py = (points[1] + 1.0) * (height - 1) / 2.0
    return list(zip(px.tolist(), py.tolist()))


def draw_tokens(image: np.ndarray, geometry: np.ndarray, scale: int = 2, centres: bool = True) -> np.ndarray:
    """Overlay token ellipses (1 sigma solid, 2 sigma thin) on a uint8 (H, W, 3) image.

    The picture is upsampled by `scale` first so that ellipses of small tokens stay legible.
    """
    geometry = np.asarray(geometry, dtype=np.float64)
    if geometry.ndim != 2 or geometry.shape[1] < 5:
        raise ValueError(f"geometry must be (N, >=5), got {geometry.shape}")
    height, width = image.shape[:2]
    canvas = Image.fromarray(image).resize((width * scale, height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas, "RGBA")
    # Pixel j of the original maps to the centre of its scale x scale block in the canvas.
    def to_canvas(points):
        return [((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5) for x, y in points]
    for token, colour in zip(geometry, size_colours(geometry)):
        rgb = tuple(int(c) for c in colour)
        draw.polygon(to_canvas(ellipse_polygon(token, 2.0, height, width)), outline=rgb + (110,), width=1)
        draw.polygon(to_canvas(ellipse_polygon(token, 1.0, height, width)), outline=rgb + (255,), width=max(1, scale // 2))
        if centres:
            (cx, cy), = to_canvas([((token[3] + 1) * (width - 1) / 2, (token[4] + 1) * (height - 1) / 2)])
            draw.ellipse([cx - 1, cy - 1, cx + 1, cy + 1], fill=rgb + (255,))
    return np.asarray(canvas, dtype=np.uint8)


def image_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, background: int = 255) -> np.ndarray:
    """Tile uint8 (H, W, 3) images into one picture; images in a row may differ in size (top-aligned)."""
    if not rows or not any(rows):
        raise ValueError("image_grid needs at least one image")
    row_heights = [max(im.shape[0] for im in row) for row in rows]
    total_w = max(sum(im.shape[1] for im in row) + pad * (len(row) + 1) for row in rows)
    total_h = sum(row_heights) + pad * (len(rows) + 1)
    grid = np.full((total_h, total_w, 3), background, dtype=np.uint8)
    top = pad
    for row, row_h in zip(rows, row_heights):
        left = pad
        for im in row:
            grid[top:top + im.shape[0], left:left + im.shape[1]] = im
            left += im.shape[1] + pad
        top += row_h + pad
    return grid


def save_png(image: np.ndarray, path) -> None:
    """Write a uint8 (H, W, 3) array as PNG."""
    Image.fromarray(image).save(path)

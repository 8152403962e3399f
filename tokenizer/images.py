"""Reading images of any kind into uint8 RGB, fitting them to whole tiles, and listing inputs.

Everything the tokenizer sees goes through `read_image`: it accepts whatever PIL can decode and returns a
(H, W, 3) uint8 array. Conversions, so that nobody has to guess:
- grey (L, 1-bit) is repeated over the three channels;
- alpha (RGBA, LA, PA) is dropped (the colour channels are kept as stored, no compositing);
- palette images (P) are expanded through their palette;
- 16-bit and 32-bit integer images (I;16, I) keep their top 8 bits of a 16-bit range (value >> 8);
- float images (F) are taken as [0, 1] and clipped;
- CMYK and YCbCr go through PIL's RGB conversion.
Unreadable or truncated files raise `ImageReadError` naming the file.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

FIT_POLICIES = ("crop", "resize", "none")


class ImageReadError(ValueError):
    """An input file could not be decoded as an image."""


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        wide = np.asarray(img, dtype=np.int64)
        grey = np.clip(wide >> 8, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "F":
        grey = np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0)
        grey = np.round(grey * 255.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def read_image(path: str | Path) -> np.ndarray:
    """Decode one image file into (H, W, 3) uint8 RGB; `ImageReadError` if it is not a readable image."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently grey
    try:
        with Image.open(path) as img:
            img.load()
            array = _to_rgb_array(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"{path}: cannot read as an image ({err})") from err
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageReadError(f"{path}: empty image")
    return array


def _expand(entry: str) -> list[Path]:
    path = Path(entry)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.is_file() and path.suffix.lower() == ".txt":
        lines = (line.strip() for line in path.read_text().splitlines())
        return [Path(line) if Path(line).is_absolute() else path.parent / line for line in lines if line]
    if path.is_file():
        return [path]
    matches = sorted(Path(p) for p in glob.glob(entry, recursive=True))
    if not matches:
        raise FileNotFoundError(f"{entry}: no such file, folder or glob match")
    return [p for p in matches if p.is_file()]


def collect_images(inputs: str | Sequence[str]) -> tuple[list[Path], list[Path]]:
    """Resolve folders (recursive), globs, `.txt` lists and files into (image paths, skipped non-image files).

    The split is by file suffix; whether an image file really decodes is decided later by `read_image`.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]
    images: list[Path] = []
    skipped: list[Path] = []
    for entry in inputs:
        for path in _expand(str(entry)):
            (images if path.suffix.lower() in IMAGE_SUFFIXES else skipped).append(path)
    return images, skipped


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray(image).resize((width, height), Image.BICUBIC, reducing_gap=None)
    return np.asarray(pil, dtype=np.uint8)


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    top = (image.shape[0] - height) // 2
    left = (image.shape[1] - width) // 2
    return image[top:top + height, left:left + width]


def fit_to_tiles(image: np.ndarray, tile: int = 256, policy: str = "crop", max_tiles: int | None = None) -> np.ndarray:
    """Make both sides whole multiples of `tile`.

    - `crop` (default): scale so the shortest side is the largest multiple of `tile` not above it (at least one
      tile; smaller images are scaled up), then centre-crop the longer side down to a multiple of `tile`.
      With `max_tiles` the shortest side is capped at `max_tiles * tile`.
    - `resize`: scale each side independently to its nearest multiple of `tile` (at least one tile).
    - `none`: the sides must already be multiples of `tile`; anything else is an error.
    Resizing is PIL bicubic on uint8.
    """
    if policy not in FIT_POLICIES:
        raise ValueError(f"unknown fit policy '{policy}' (choose from {', '.join(FIT_POLICIES)})")
    height, width = image.shape[:2]
    if policy == "none":
        if height % tile or width % tile:
            raise ValueError(f"image of {height}x{width} is not a whole number of {tile}x{tile} tiles "
                             f"(use policy 'crop' or 'resize')")
        return image
    if policy == "resize":
        new_h = max(1, round(height / tile)) * tile
        new_w = max(1, round(width / tile)) * tile
        return _resize(image, new_h, new_w)
    short = min(height, width)
    tiles = max(1, short // tile)
    if max_tiles is not None:
        tiles = min(tiles, max_tiles)
    scale = tiles * tile / short
    new_h = max(tiles * tile, round(height * scale))
    new_w = max(tiles * tile, round(width * scale))
    resized = _resize(image, new_h, new_w)
    return _center_crop(resized, new_h // tile * tile, new_w // tile * tile)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1] as `uint8 / 127.5 - 1` (the released convention)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3), rounding `127.5 (x + 1)` after clamping."""
    scaled = ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return scaled.movedim(-3, -1).cpu().numpy()


def read_images(paths: Iterable[Path]) -> tuple[list[tuple[Path, np.ndarray]], list[tuple[Path, str]]]:
    """Read many files: (readable (path, image) pairs, unreadable (path, reason) pairs)."""
    good, bad = [], []
    for path in paths:
        try:
            good.append((path, read_image(path)))
        except ImageReadError as err:
            bad.append((path, str(err)))
    return good, bad

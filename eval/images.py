"""Sample sets for evaluation: image folders, globs and ADM-style ``.npz`` files, read as uint8 RGB.

Every source is a sequence of (H, W, 3) uint8 arrays with a name per image (the file name, or the index in an
``.npz``) and a ``content_hash`` that identifies its pixels for caching.

Float samples are quantised the way the ADM sampling scripts store them: mapped to [-1, 1], then
``uint8(clamp(127.5 * x + 128, 0, 255))`` (truncation; for [0, 255] input this is rounding half up).
"""
from __future__ import annotations

import glob
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VALUE_RANGES = {"-1,1": (-1.0, 1.0), "0,1": (0.0, 1.0), "0,255": (0.0, 255.0)}


class InputError(ValueError):
    """A sample set that cannot be evaluated; the message names the file and the problem."""


def quantize_float_images(images: np.ndarray, value_range: str | None = None, source: str = "samples") -> np.ndarray:
    """Float images (N, H, W, 3) -> uint8 by the documented rule.

    ``value_range`` is one of ``"-1,1"``, ``"0,1"``, ``"0,255"``; ``None`` infers [-1, 1] when every value lies
    there and [0, 255] otherwise, and refuses anything outside both. NaN or infinite values are refused.
    """
    images = np.asarray(images)
    bad = ~np.isfinite(images)
    if bad.any():
        raise InputError(f"{source}: {int(bad.sum())} NaN or infinite values in the samples")
    low, high = float(images.min()), float(images.max())
    if value_range is None:
        if low >= -1 and high <= 1:
            value_range = "-1,1"
            if low >= 0:
                warnings.warn(f"{source}: float samples lie in [0, 1]; treating them as [-1, 1]. "
                              "Pass the value range explicitly (--sample-range 0,1) if they are [0, 1] images.")
        elif low >= 0 and high <= 255:
            value_range = "0,255"
        else:
            raise InputError(f"{source}: float samples span [{low:g}, {high:g}], outside both [-1, 1] and "
                             "[0, 255]; pass their range explicitly (--sample-range -1,1 | 0,1 | 0,255)")
    if value_range not in VALUE_RANGES:
        raise InputError(f"unknown value range {value_range!r}; use one of {sorted(VALUE_RANGES)}")
    lo, hi = VALUE_RANGES[value_range]
    unit = (images.astype(np.float64) - lo) / (hi - lo) * 2 - 1
    return np.clip(127.5 * unit + 128, 0, 255).astype(np.uint8)


def _image_key(array: np.ndarray) -> bytes:
    return f"{array.shape}".encode() + np.ascontiguousarray(array).tobytes()


class ArrayImages:
    """Images held in memory as an (N, H, W, 3) uint8 array (for example an ADM ``arr_0``)."""

    def __init__(self, images: np.ndarray, names: list[str] | None = None, source: str = "array",
                 value_range: str | None = None):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise InputError(f"{source}: images must be (N, H, W, 3) RGB (NHWC), got shape {images.shape}")
        if images.dtype != np.uint8:
            if not np.issubdtype(images.dtype, np.floating):
                raise InputError(f"{source}: images must be uint8 or float, got {images.dtype}")
            images = quantize_float_images(images, value_range, source)
        self.images = images
        self.names = names if names is not None else [f"{i:06d}" for i in range(len(images))]
        self.source = source
        self._hash: str | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[index]

    @property
    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = hashlib.sha256(_image_key(self.images)).hexdigest()
        return self._hash


class FileImages:
    """Image files read lazily with PIL and converted to RGB (palette, grey and alpha images included)."""

    def __init__(self, paths: list[Path], source: str):
        self.paths = paths
        self.names = [p.name for p in paths]
        self.source = source
        self._hash: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        with Image.open(self.paths[index]) as image:
            return np.array(image.convert("RGB"))

    @property
    def content_hash(self) -> str:
        """Hash of the files' bytes and names, in order (decoding is deterministic, so bytes identify pixels)."""
        if self._hash is None:
            digest = hashlib.sha256()
            for path in self.paths:
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
            self._hash = digest.hexdigest()
        return self._hash


def list_image_files(folder_or_glob: str | os.PathLike) -> list[Path]:
    """Sorted image files of a folder (not recursive) or of a glob pattern."""
    text = str(folder_or_glob)
    if Path(text).is_dir():
        candidates = Path(text).iterdir()
    elif glob.has_magic(text):
        candidates = (Path(p) for p in glob.glob(text, recursive=True))
    else:
        raise InputError(f"{text}: not a folder, a glob pattern or an .npz file")
    files = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"{text}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_npz_images(path: str | os.PathLike, value_range: str | None = None) -> ArrayImages:
    """The ``arr_0`` images of an ADM sample or reference ``.npz`` (uint8 NHWC, or float: see quantisation)."""
    with np.load(path) as data:
        if "arr_0" not in data.files:
            raise InputError(f"{path}: no 'arr_0' images in this .npz (keys: {', '.join(data.files) or 'none'})")
        images = data["arr_0"]
    return ArrayImages(images, source=str(path), value_range=value_range)


def open_images(spec: str | os.PathLike, value_range: str | None = None, min_count: int = 2):
    """A folder, a glob or an ``.npz`` as an image source with at least ``min_count`` images."""
    text = str(spec)
    if text.endswith(".npz"):
        if not Path(text).is_file():
            raise InputError(f"{text}: file not found")
        source = load_npz_images(text, value_range)
    else:
        source = FileImages(list_image_files(text), source=text)
    if len(source) < min_count:
        raise InputError(f"{text}: {len(source)} image(s); the metrics need at least {min_count}")
    return source


def pair_by_name(reconstructions, originals) -> tuple[list[int], list[int]]:
    """Indices pairing reconstructions with originals of the same file stem (extension may differ)."""
    def stems(source) -> dict[str, int]:
        table = {}
        for index, name in enumerate(source.names):
            stem = Path(name).stem
            if stem in table:
                raise InputError(f"{source.source}: two images named {stem!r} (extensions differ?)")
            table[stem] = index
        return table

    recon, orig = stems(reconstructions), stems(originals)
    missing = sorted(set(recon) - set(orig))
    if missing:
        raise InputError(f"{len(missing)} reconstruction(s) have no original of the same name in "
                         f"{originals.source}, e.g. {missing[:3]}")
    common = sorted(recon)
    return [recon[s] for s in common], [orig[s] for s in common]


class SubsetImages:
    """A selection of another source's images, in the given order."""

    def __init__(self, source, indices: list[int]):
        self.base, self.indices = source, list(indices)
        self.names = [source.names[i] for i in self.indices]
        self.source = source.source

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.base[self.indices[index]]

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(f"{self.base.content_hash}|{self.indices}".encode()).hexdigest()

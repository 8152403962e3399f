"""Tiny models and data for the generator tests: a random-weight tiny GPSToken, toy labelled images, shards."""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from generator.extraction import ExtractionSettings, extract_tokens
from tokenizer.model import GPSToken
from tokenizer.official import config_from_released

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official"
NUM_CLASSES = 3


def tiny_tokenizer_config():
    """The tiny released-format config of the fixtures: 64x64 tiles, 16 tokens of 5 + 8 numbers."""
    released = json.loads((FIXTURES / "tiny_gpstoken.json").read_text())
    return config_from_released(released["gpsconfig"], released["decoderconfig"], name="tiny")


def tiny_tokenizer(seed: int = 0) -> GPSToken:
    torch.manual_seed(seed)
    return GPSToken(tiny_tokenizer_config()).eval()


class ToyImages(torch.utils.data.Dataset):
    """64x64 RGB images of one class-coloured rectangle on a grey background; the class sets the colour and the
    side of the image the rectangle sits on, the seed jitters size and position. Items: (uint8 HWC, label)."""

    COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230))

    def __init__(self, count: int, seed: int = 0, size: int = 64):
        self.count, self.seed, self.size = count, seed, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        label = index % NUM_CLASSES
        rng = np.random.default_rng([self.seed, index])
        image = np.full((self.size, self.size, 3), 128, np.uint8)
        side = int(rng.integers(12, 28))
        x0 = int(rng.integers(0, self.size // 2 - side // 2)) + (self.size // 2 if label == 1 else 0)
        y0 = int(rng.integers(0, self.size - side))
        image[y0:y0 + side, x0:x0 + side] = self.COLOURS[label]
        return image, label


def make_shards(directory: Path, count: int = 12, *, shard_size: int = 5, hflip: bool = True,
                tokenizer: GPSToken | None = None, seed: int = 0):
    """Extract `count` toy images into `directory` with the tiny tokenizer; returns the statistics."""
    return extract_tokens(tokenizer or tiny_tokenizer(), ToyImages(count, seed), NUM_CLASSES,
                          ExtractionSettings(str(directory), shard_size=shard_size, batch_size=8, num_workers=0,
                                             hflip=hflip, tokenizer_description="tiny random"))


_CACHE: dict[tuple, Path] = {}


def cached_shards(count: int, seed: int = 0, *, shard_size: int = 8, hflip: bool = True) -> Path:
    """Shards of `count` toy images, extracted once per test session (read-only: copy before changing them)."""
    key = (count, seed, shard_size, hflip)
    if key not in _CACHE:
        directory = Path(tempfile.mkdtemp(prefix="gpstoken_shards_"))
        atexit.register(shutil.rmtree, directory, True)
        make_shards(directory, count, shard_size=shard_size, hflip=hflip, seed=seed)
        _CACHE[key] = directory
    return _CACHE[key]

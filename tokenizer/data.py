"""Training data for the tokenizer: image sources, the crop/flip transform, and the partition per sample.

Sources (`DataConfig.source`), each a list of images addressed by index:
- `folder`: every image under a folder, recursively (ImageNet-style class folders work as they are);
- `list`: a `.txt` file with one image path per line (relative paths are relative to the list file);
- `fashion_mnist`: the idx files of Fashion-MNIST (`train-images-idx3-ubyte.gz` / `t10k-...`), default folder
  `/usr/share/datasets/fashion-mnist` (Debian package `dataset-fashion-mnist`); grey, repeated to RGB;
- `photos`: the photos bundled with scikit-image (random crops, for smoke runs without any dataset);
- `shards`: tar shards for datasets that do not fit a file system as single files (webdataset layout).

Shards (ImageNet example). Each shard is a plain, uncompressed tar whose members are images named
`<key>.<ext>` (`.jpg`, `.png`, ...); other members (`<key>.cls`, `<key>.json`) are ignored. Write them with
`tar` or webdataset's `ShardWriter`, for example 1,000 images per shard:

    imagenet-train-000000.tar, imagenet-train-000001.tar, ...   (1,282 shards for the 1.28 M train images)

and point `data.path` at a folder of shards, a glob (`/data/in1k/imagenet-train-*.tar`) or a `.txt` list of
shard paths. At start every shard's tar headers are read once (about one second per thousand shards on a
local disk) into an index of (shard, offset, size); samples are then read by offset, so shards support the
same exact resume and per-process sharding as files.

Per sample (`TokenizerDataset[(index, draw_seed)]`): decode to uint8 RGB, scale the shortest side to
`image_size` (unless `resize: false`), crop `image_size` square (centre or random), flip horizontally with
p = 0.5, and, with `partition: workers`, run the exact entropy partition in the loader worker. The other modes
partition once per micro-batch in the training process (`partition_batch`): `batch` with the vectorised NumPy
partition on the CPU, `gpu` with the PyTorch partition (`tokenizer.partition_torch`) on the training device. The random crop and the flip are drawn from `draw_seed` (see
`tokenizer.engine.ShardedInfiniteSampler`), so they do not depend on workers or on resuming.

Unreadable files are skipped: the next readable image takes their place, a warning names the file, and the
batch carries the count in `skipped` (the trainer logs the running total).
"""
from __future__ import annotations

import gzip
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from .images import IMAGE_SUFFIXES, ImageReadError, collect_images, read_image
from .partition import entropy_partition, entropy_partition_batch

logger = logging.getLogger("gpstoken.train")

SOURCES = ("folder", "list", "fashion_mnist", "photos", "shards")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Colour photos shipped inside scikit-image (public domain), used by the `photos` source.
BUNDLED_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "ihc.png", "retina.jpg")
#: The `photos` test split: photos held out of the training split.
HELD_OUT_PHOTOS = ("coffee.png", "retina.jpg")
MAX_CONSECUTIVE_UNREADABLE = 100


@dataclass
class DataConfig:
    source: str = "folder"          # folder | list | fashion_mnist | photos | shards
    path: str = ""                  # folder, .txt list, idx folder, or shard folder/glob/list ("" = source default)
    split: str = "train"            # fashion_mnist and photos: train | test
    image_size: int = 256           # side of the square training crop (one tile)
    resize: bool = True             # scale the shortest side to image_size before cropping
    crop: str = "center"            # center | random
    hflip: bool = True              # horizontal flip with p = 0.5
    limit: int = 0                  # use only the first N images (0 = all)
    photo_crops: int = 1024         # photos: samples per epoch (random crops of the few photos)
    num_workers: int = 8
    partition: str = "workers"      # workers (per sample in loader workers) | batch (CPU) | gpu (training device)

    def __post_init__(self) -> None:
        choices = {"source": SOURCES, "crop": ("center", "random"), "partition": ("workers", "batch", "gpu"),
                   "split": ("train", "test")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"data.{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if self.image_size < 8 or self.limit < 0 or self.num_workers < 0:
            raise ValueError(f"data: image_size >= 8, limit >= 0 and num_workers >= 0 are required, got "
                             f"{self.image_size}, {self.limit}, {self.num_workers}")


# --------------------------------------------------------------------------------------------------------------
# Sources: index -> uint8 (H, W, 3)
# --------------------------------------------------------------------------------------------------------------

class ImageSource(Protocol):
    def __len__(self) -> int: ...
    def load(self, index: int) -> np.ndarray: ...      # uint8 (H, W, 3); ImageReadError if unreadable
    def name(self, index: int) -> str: ...


class ImageFiles:
    """Image files by path."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        return read_image(self.paths[index])

    def name(self, index: int) -> str:
        return str(self.paths[index])


class FashionMNIST:
    """Fashion-MNIST from its gzip'd idx files: 28x28 grey images repeated to RGB."""

    FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}

    def __init__(self, folder: str | Path, split: str):
        path = Path(folder) / self.FILES[split]
        if not path.is_file():
            raise FileNotFoundError(f"Fashion-MNIST file {path} not found (Debian: apt-get install "
                                    "dataset-fashion-mnist, or set data.path to the folder of the idx files)")
        raw = gzip.decompress(path.read_bytes())
        magic, count, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
        if magic != 2051 or len(raw) != 16 + count * rows * cols:
            raise ValueError(f"{path} is not an idx3 image file (magic {magic}, {len(raw)} bytes)")
        self.images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, rows, cols)
        self.path = path

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> np.ndarray:
        return np.repeat(self.images[index][..., None], 3, axis=-1)

    def name(self, index: int) -> str:
        return f"{self.path}[{index}]"


class BundledPhotos:
    """scikit-image's colour photos, each repeated so an epoch holds `samples` random crops. The few photos are
    decoded once per process (they would otherwise be decoded again for every crop)."""

    def __init__(self, split: str, samples: int):
        import skimage

        folder = Path(skimage.__file__).parent / "data"
        names = [n for n in BUNDLED_PHOTOS if (n in HELD_OUT_PHOTOS) == (split == "test")]
        self.files = ImageFiles([folder / n for n in names if (folder / n).is_file()])
        if not len(self.files):
            raise FileNotFoundError(f"no bundled photos found in {folder}")
        self.samples = samples
        self._decoded: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.samples

    def load(self, index: int) -> np.ndarray:
        photo = index % len(self.files)
        if photo not in self._decoded:
            self._decoded[photo] = self.files.load(photo)
        return self._decoded[photo]

    def name(self, index: int) -> str:
        return self.files.name(index % len(self.files))


class TarShards:
    """Images inside uncompressed tar shards, read by offset through an index built from the tar headers."""

    def __init__(self, shards: list[Path]):
        if not shards:
            raise FileNotFoundError("no tar shards given")
        self.shards = shards
        self.members: list[tuple[int, int, int, str]] = []   # (shard, data offset, size, member name)
        for number, shard in enumerate(shards):
            with tarfile.open(shard, "r:") as archive:
                for member in archive:
                    if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                        self.members.append((number, member.offset_data, member.size, member.name))
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.members)

    def load(self, index: int) -> np.ndarray:
        import io

        from PIL import Image

        shard, offset, size, name = self.members[index]
        handle = self._handles.get(shard)
        if handle is None:   # opened lazily, so each loader worker has its own file handles
            handle = self._handles[shard] = open(self.shards[shard], "rb")
        handle.seek(offset)
        data = handle.read(size)
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        except (OSError, ValueError, SyntaxError) as error:
            raise ImageReadError(f"{self.name(index)}: {error}") from error

    def name(self, index: int) -> str:
        shard, _, _, member = self.members[index]
        return f"{self.shards[shard]}:{member}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}   # file handles do not travel to worker processes


def open_source(config: DataConfig) -> ImageSource:
    """The configured image source (listing skipped non-image files in the log)."""
    if config.source == "fashion_mnist":
        source = FashionMNIST(config.path or FASHION_MNIST_DIR, config.split)
    elif config.source == "photos":
        source = BundledPhotos(config.split, config.photo_crops)
    elif config.source == "shards":
        shards, _ = _list_files(config.path, suffixes=(".tar",))
        source = TarShards(shards)
    else:
        if config.source == "list" and not config.path.endswith(".txt"):
            raise ValueError(f"data.source 'list' needs a .txt file as data.path, got {config.path!r}")
        paths, skipped = collect_images(config.path)
        if skipped:
            logger.warning("skipped %d non-image file(s) under %s (e.g. %s)", len(skipped), config.path, skipped[0])
        if not paths:
            raise FileNotFoundError(f"no images found in {config.path!r}")
        source = ImageFiles(paths)
    if config.limit:
        source = _Limited(source, config.limit)
    return source


def _list_files(path: str, suffixes: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    if not path:
        raise ValueError("data.path is required for this source")
    entry = Path(path)
    if entry.is_dir():
        files = sorted(p for p in entry.rglob("*") if p.is_file())
    elif entry.suffix == ".txt" and entry.is_file():
        files = [Path(line.strip()) if Path(line.strip()).is_absolute() else entry.parent / line.strip()
                 for line in entry.read_text().splitlines() if line.strip()]
    else:
        import glob

        files = sorted(Path(p) for p in glob.glob(path))
    return [f for f in files if f.suffix in suffixes], [f for f in files if f.suffix not in suffixes]


class _Limited:
    def __init__(self, source: ImageSource, limit: int):
        self.source, self.count = source, min(limit, len(source))

    def __len__(self) -> int:
        return self.count

    def load(self, index: int) -> np.ndarray:
        return self.source.load(index)

    def name(self, index: int) -> str:
        return self.source.name(index)


# --------------------------------------------------------------------------------------------------------------
# Transform and dataset
# --------------------------------------------------------------------------------------------------------------

def crop_and_flip(image: np.ndarray, size: int, *, resize: bool, crop: str, hflip: bool,
                  generator: torch.Generator) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 tensor (size, size, 3): shortest side to `size` (when `resize`, or when the image
    is smaller), a centre or random square crop, and a horizontal flip with p = 0.5, drawn from `generator`."""
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a writable copy
    if resize or min(pixels.shape[1:]) < size:
        pixels = TF.resize(pixels, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    height, width = pixels.shape[1:]
    if crop == "random":
        top = int(torch.randint(height - size + 1, (), generator=generator))
        left = int(torch.randint(width - size + 1, (), generator=generator))
    else:
        top, left = (height - size) // 2, (width - size) // 2
    pixels = TF.crop(pixels, top, left, size, size)
    if hflip and bool(torch.rand((), generator=generator) < 0.5):
        pixels = TF.horizontal_flip(pixels)
    return pixels.permute(1, 2, 0).contiguous()


@dataclass(frozen=True)
class PartitionSettings:
    """How the initial partition is computed for one tile (from the model config)."""

    num_tokens: int
    min_size: int = 8
    weight: float = 2.5


class TokenizerDataset(torch.utils.data.Dataset):
    """`dataset[(index, draw_seed)]` -> {"pixels": uint8 (S, S, 3), "skipped": int, and with the partition in
    workers "init_geometry": float32 (N, 5), "boxes": float32 (N, 4)}."""

    def __init__(self, source: ImageSource, config: DataConfig, partition: PartitionSettings):
        self.source, self.config, self.partition = source, config, partition

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor | int]:
        index, draw_seed = key if isinstance(key, tuple) else (key, key)
        image, skipped = self._load_readable(index)
        generator = torch.Generator().manual_seed(draw_seed)
        pixels = crop_and_flip(image, self.config.image_size, resize=self.config.resize, crop=self.config.crop,
                               hflip=self.config.hflip, generator=generator)
        sample: dict[str, torch.Tensor | int] = {"pixels": pixels, "skipped": skipped}
        if self.config.partition == "workers":
            result = entropy_partition(pixels.numpy(), self.partition.num_tokens, min_size=self.partition.min_size,
                                       weight=self.partition.weight, tile_size=self.config.image_size)
            sample["init_geometry"] = torch.from_numpy(result.geometry)
            sample["boxes"] = torch.from_numpy(result.boxes)
        return sample

    def _load_readable(self, index: int) -> tuple[np.ndarray, int]:
        for skipped in range(MAX_CONSECUTIVE_UNREADABLE):
            candidate = (index + skipped) % len(self.source)
            try:
                return self.source.load(candidate), skipped
            except ImageReadError as error:
                logger.warning("skipping unreadable image: %s", error)
        raise RuntimeError(f"{MAX_CONSECUTIVE_UNREADABLE} consecutive unreadable images from "
                           f"{self.source.name(index)}: check the data source")


def build_dataset(config: DataConfig, partition: PartitionSettings) -> TokenizerDataset:
    return TokenizerDataset(open_source(config), config, partition)


def partition_batch(pixels: torch.Tensor, partition: PartitionSettings,
                    device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition a micro-batch: uint8 (B, S, S, 3) -> (init_geometry (B, N, 5), boxes (B, N, 4)) float32.

    With a `device`, the PyTorch partition runs there (`gpu` mode); without, the NumPy one on the CPU (`batch`
    mode). Both give the per-sample result of `entropy_partition`."""
    if device is not None:
        from .partition_torch import entropy_partition_torch

        return entropy_partition_torch(pixels.to(device), partition.num_tokens, min_size=partition.min_size,
                                       weight=partition.weight, tile_size=pixels.shape[1])
    geometry, boxes = entropy_partition_batch(pixels.cpu().numpy(), partition.num_tokens,
                                              min_size=partition.min_size, weight=partition.weight,
                                              tile_size=pixels.shape[1])
    return torch.from_numpy(geometry), torch.from_numpy(boxes)

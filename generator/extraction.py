"""Encoding a labelled image dataset once with a trained tokenizer into token shards (`generator.shards`).

Pipeline per image: (optionally) its horizontal mirror as a second variant; the entropy partition of each
variant (CPU, inside the DataLoader workers, where it parallelises: it costs ~150 ms per 256 image); the
tokenizer's encoder on the accelerator; the tokens, init geometry and label go into the shard of the image.

The mirror is partitioned afresh rather than mirroring the original partition: the partition's integer halving
and tie rules are not mirror-symmetric, and the texture model must see layouts exactly as the partition makes them.

Work is split by shard: shard k holds images `k * shard_size ...`; the processes of an `accelerate launch` take
the pending shards round-robin, so a resumed run redoes only unfinished shards, and the result does not depend on
the number of processes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenizer.model import GPSToken

from .shards import ShardPlan, ShardStats, finalize_shards, pending_shards, write_plan, write_shard

logger = logging.getLogger("gpstoken.extract")

__all__ = ["ExtractionSettings", "LabelledImages", "open_labelled_images", "PartitionedImages", "encode_batch",
           "extract_tokens"]

FASHION_MNIST_LABELS = {"train": "train-labels-idx1-ubyte.gz", "test": "t10k-labels-idx1-ubyte.gz"}


@dataclass(frozen=True)
class ExtractionSettings:
    output_dir: str
    shard_size: int = 10_000
    batch_size: int = 64
    num_workers: int = 8
    hflip: bool = True                  # store a horizontally mirrored copy of every image as a second variant
    num_tokens: int | None = None       # tokens per image; default: the tokenizer config's
    tokenizer_description: str = ""     # recorded in the index (config name, weights file)


def _as_uint8_hwc(image: Any, where: str) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: images must be uint8 RGB (H, W, 3), got {image.dtype} {image.shape}")
    return image


class LabelledImages(torch.utils.data.Dataset):
    """Images of a `tokenizer.data` source with their class labels, scaled (shortest side) and centre-cropped
    to one tile, never flipped (the mirrored copy is a separate stored variant). Item -> (uint8 (S, S, 3), label).
    An unreadable image is an error naming the file: skipping it would shift the labels."""

    def __init__(self, source, labels: np.ndarray, image_size: int):
        if len(labels) != len(source):
            raise ValueError(f"{len(labels)} labels for {len(source)} images")
        self.source, self.labels, self.image_size = source, np.asarray(labels, dtype=np.int64), image_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        from tokenizer.data import crop_and_flip

        pixels = crop_and_flip(self.source.load(index), self.image_size, resize=True, crop="center", hflip=False,
                               generator=torch.Generator())
        return pixels.numpy(), int(self.labels[index])


def _fashion_mnist_labels(folder: str | Path, split: str, count: int) -> np.ndarray:
    import gzip

    path = Path(folder) / FASHION_MNIST_LABELS[split]
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST labels {path} not found")
    raw = gzip.decompress(path.read_bytes())
    magic, number = np.frombuffer(raw[:8], dtype=">u4")
    if magic != 2049 or len(raw) != 8 + number:
        raise ValueError(f"{path} is not an idx1 label file (magic {magic}, {len(raw)} bytes)")
    return np.frombuffer(raw, dtype=np.uint8, offset=8)[:count].astype(np.int64)


def open_labelled_images(source: str, path: str, image_size: int, *, split: str = "train",
                         limit: int = 0) -> tuple[LabelledImages, list[str]]:
    """A labelled image dataset and its class names. `folder`/`list`: the class of an image is the name of its
    parent folder (ImageNet's train layout: one folder per synset), classes numbered in sorted name order;
    `fashion_mnist`: the idx label file next to the images."""
    from tokenizer.data import FASHION_MNIST_DIR, DataConfig, open_source

    if source not in ("folder", "list", "fashion_mnist"):
        raise ValueError(f"token extraction reads labelled images from 'folder', 'list' or 'fashion_mnist', "
                         f"not {source!r}")
    images = open_source(DataConfig(source=source, path=path, split=split, limit=limit, image_size=image_size))
    if source == "fashion_mnist":
        labels = _fashion_mnist_labels(path or FASHION_MNIST_DIR, split, len(images))
        names = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot"]
    else:
        folders = [Path(images.name(i)).parent.name for i in range(len(images))]
        names = sorted(set(folders))
        number = {name: k for k, name in enumerate(names)}
        labels = np.array([number[f] for f in folders], dtype=np.int64)
    return LabelledImages(images, labels, image_size), names


class PartitionedImages(torch.utils.data.Dataset):
    """Wraps a dataset of `(uint8 RGB image (S, S, 3), label)` items, S the tokenizer's tile size.

    Item -> dict(pixels (V, 3, S, S) float in [-1, 1], geometry (V, N, 5), boxes (V, N, 4), label) with V = 1,
    or 2 when `hflip` (the original, then its mirror).
    """

    def __init__(self, images: torch.utils.data.Dataset, num_tokens: int, tile_size: int, *, hflip: bool,
                 min_size: int = 8, weight: float = 2.5):
        self.images, self.num_tokens, self.tile_size = images, num_tokens, tile_size
        self.hflip, self.min_size, self.weight = hflip, min_size, weight

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from tokenizer.partition import entropy_partition

        item = self.images[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"image dataset item {index}: expected (image, label), got {type(item).__name__}")
        image = _as_uint8_hwc(item[0], f"image dataset item {index}")
        if image.shape[:2] != (self.tile_size, self.tile_size):
            raise ValueError(f"image dataset item {index}: images must be {self.tile_size}x{self.tile_size} "
                             f"(the tokenizer's tile), got {image.shape[0]}x{image.shape[1]}")
        variants = [image, np.ascontiguousarray(image[:, ::-1])] if self.hflip else [image]
        parts = [entropy_partition(v, self.num_tokens, min_size=self.min_size, weight=self.weight,
                                   tile_size=self.tile_size) for v in variants]
        pixels = torch.from_numpy(np.stack(variants)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return {"pixels": pixels,
                "geometry": torch.from_numpy(np.stack([p.geometry for p in parts])).float(),
                "boxes": torch.from_numpy(np.stack([p.boxes for p in parts])).float(),
                "label": torch.tensor(int(item[1]), dtype=torch.int64)}


@torch.no_grad()
def encode_batch(tokenizer: GPSToken, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """A collated batch of `PartitionedImages` -> tokens (B, V, N, 5 + C), layout (B, V, N, 5) as numpy."""
    pixels, geometry, boxes = batch["pixels"], batch["geometry"], batch["boxes"]
    b, v = pixels.shape[:2]
    tokens = tokenizer.encode(pixels.flatten(0, 1).to(device), geometry.flatten(0, 1).to(device),
                              boxes.flatten(0, 1).to(device))
    return (tokens.float().cpu().numpy().reshape(b, v, *tokens.shape[1:]),
            geometry.numpy().reshape(b, v, *geometry.shape[2:]))


def extract_tokens(tokenizer: GPSToken, images: torch.utils.data.Dataset, num_classes: int,
                   settings: ExtractionSettings, accelerator=None) -> ShardStats | None:
    """Encode `images` into shards under `settings.output_dir`; resumable; returns the statistics (main process).

    `tokenizer` should hold the EMA weights, in eval mode. With an `accelerate.Accelerator` the pending shards
    are dealt to its processes; without one everything runs here on the tokenizer's device.
    """
    config = tokenizer.config
    num_tokens = settings.num_tokens or config.num_tokens
    if len(images) == 0:
        raise ValueError("extract_tokens: the image dataset is empty")
    plan = ShardPlan(num_samples=len(images), shard_size=settings.shard_size, num_tokens=num_tokens,
                     token_dim=config.token_dim, variants=("original", "hflip") if settings.hflip else ("original",),
                     num_classes=num_classes, tile_size=config.tile_size, min_size=config.partition_min_size,
                     tokenizer=settings.tokenizer_description)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    main = rank == 0
    if main:
        write_plan(settings.output_dir, plan)
    if accelerator:
        accelerator.wait_for_everyone()
    pending = pending_shards(settings.output_dir, plan)  # every process sees the same list: nobody wrote yet
    if accelerator:
        accelerator.wait_for_everyone()
    mine = pending[rank::world]
    if main:
        logger.info("%s: %d of %d shard(s) to encode over %d process(es)", settings.output_dir, len(pending),
                    plan.num_shards, world)
    dataset = PartitionedImages(images, num_tokens, config.tile_size, hflip=settings.hflip,
                                min_size=config.partition_min_size, weight=config.partition_weight)
    device = next(tokenizer.parameters()).device
    tokenizer.eval()
    progress = tqdm(total=sum(len(plan.shard_range(k)) for k in mine), unit="img", desc=f"extract[{rank}]",
                    position=rank, dynamic_ncols=True)
    for shard in mine:
        subset = torch.utils.data.Subset(dataset, list(plan.shard_range(shard)))
        loader = torch.utils.data.DataLoader(subset, batch_size=settings.batch_size, shuffle=False,
                                             num_workers=settings.num_workers)
        tokens, layouts, labels = [], [], []
        for batch in loader:
            batch_tokens, batch_layout = encode_batch(tokenizer, batch, device)
            tokens.append(batch_tokens)
            layouts.append(batch_layout)
            labels.append(batch["label"].numpy())
            progress.update(len(batch_tokens))
        label_array = np.concatenate(labels)
        if ((label_array < 0) | (label_array >= num_classes)).any():
            raise ValueError(f"shard {shard}: labels {sorted(set(label_array.tolist()))[:10]}... outside the "
                             f"{num_classes} classes")
        write_shard(settings.output_dir, plan, shard, np.concatenate(tokens), np.concatenate(layouts), label_array)
    progress.close()
    if accelerator:
        accelerator.wait_for_everyone()
    if not main:
        return None
    stats = finalize_shards(settings.output_dir)
    logger.info("%s: complete, %d samples, statistics in stats.json", settings.output_dir, plan.num_samples)
    return stats


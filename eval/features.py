"""Running TF-Inception over sample sets, and the per-set statistics the metrics need (with an on-disk cache).

Batches are decoded by DataLoader workers as uint8 and resized on the device, so a batch crosses the bus as
bytes. Sets with images of different sizes are accepted: each image is resized to 299x299 on its own (the
protocol resizes every image to 299x299 anyway, so the features are those of the images one at a time).
With several processes launched by ``accelerate launch``, ``distributed=True`` gives each process a contiguous
shard and gathers the features back in input order.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from eval.images import InputError, open_images
from eval.inception import LOGITS_DIM, POOL_DIM, SPATIAL_DIM, InceptionFeatureExtractor, resize_like_tf1
from eval.metrics import feature_statistics

# Bump when anything changing the features or statistics of a set changes (invalidates cached statistics).
PROTOCOL_VERSION = "adm-tf-inception-v1"


@dataclass
class FeatureSet:
    """Per-image features of one set; ``logits`` is ``None`` when the weights have no logits layer."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray | None


@dataclass
class SetStatistics:
    """What the metrics need from a set: Gaussian statistics, and pool features where images were seen."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None
    logits: np.ndarray | None = None
    count: int | None = None
    origin: dict = field(default_factory=dict)

    @classmethod
    def from_features(cls, features: FeatureSet, origin: dict | None = None) -> "SetStatistics":
        mu, sigma = feature_statistics(features.pool)
        mu_s, sigma_s = feature_statistics(features.spatial)
        return cls(mu, sigma, mu_s, sigma_s, features.pool, features.logits, len(features.pool), origin or {})


class _IndexedImages(Dataset):
    def __init__(self, source, indices):
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.source[self.indices[i]])).permute(2, 0, 1)


def _collate(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack uint8 images of one size; resize mixed sizes one by one to 299x299 float (what the network does)."""
    if all(img.shape == images[0].shape for img in images):
        return torch.stack(images)
    return torch.cat([resize_like_tf1(img[None].float()) for img in images])


def _extract_indices(source, indices, extractor, batch_size, num_workers, device, progress, desc):
    loader = DataLoader(_IndexedImages(source, indices), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=torch.device(device).type == "cuda",
                        persistent_workers=False)
    pool, spatial, logits = [], [], []
    with tqdm(total=len(indices), desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            out = extractor(batch.to(device, non_blocking=True))
            pool.append(out.pool.float().cpu())
            spatial.append(out.spatial.float().cpu())
            if out.logits is not None:
                logits.append(out.logits.float().cpu())
            bar.update(len(batch))
    if not pool:  # an empty shard (more processes than images)
        pool, spatial = [torch.zeros(0, POOL_DIM)], [torch.zeros(0, SPATIAL_DIM)]
        logits = [torch.zeros(0, LOGITS_DIM)] if extractor.has_logits else []
    return torch.cat(pool), torch.cat(spatial), torch.cat(logits) if logits else None


def extract_features(source, extractor: InceptionFeatureExtractor, *, batch_size: int = 100, num_workers: int = 0,
                     device: str | torch.device = "cpu", progress: bool = True, desc: str = "Inception features",
                     distributed: bool = False) -> FeatureSet:
    """Pool, spatial and logits features of every image of ``source``, in order, as float32 arrays."""
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    rank, world = 0, 1
    if distributed:
        from accelerate import PartialState

        state = PartialState()
        rank, world, device = state.process_index, state.num_processes, state.device
        progress = progress and state.is_local_main_process
    per_rank = math.ceil(len(source) / world)
    start = min(rank * per_rank, len(source))
    extractor.to(device)
    parts = _extract_indices(source, range(start, min(start + per_rank, len(source))), extractor, batch_size,
                             num_workers, device, progress, desc)
    if world > 1:
        parts = [None if part is None else _gather_in_order(part, per_rank, len(source), device) for part in parts]
    return FeatureSet(*(None if part is None else part.numpy() for part in parts))


def _gather_in_order(part: torch.Tensor, per_rank: int, total: int, device) -> torch.Tensor:
    """All processes' contiguous shards, padded to one length for the collective, concatenated by rank."""
    from accelerate.utils import gather

    padded = torch.zeros(per_rank, part.shape[1])
    padded[:len(part)] = part
    everything = gather(padded.to(device)).cpu().view(-1, per_rank, part.shape[1])
    counts = [max(0, min(per_rank, total - r * per_rank)) for r in range(everything.shape[0])]
    return torch.cat([everything[r, :count] for r, count in enumerate(counts)])


# ----------------------------------------------------------------------------------------------------------
# Statistics files: ADM reference batches and our cache
# ----------------------------------------------------------------------------------------------------------

def _check_statistics(path, mu, sigma, dim, names) -> None:
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise InputError(f"{path}: {names[0]} has shape {mu.shape} and {names[1]} {sigma.shape}; the ADM protocol "
                         f"expects ({dim},) and ({dim}, {dim})")


def load_statistics_npz(path: str | os.PathLike) -> SetStatistics:
    """Statistics from an ADM reference batch (``mu``, ``sigma``; optional ``mu_s``, ``sigma_s``), validated."""
    with np.load(path) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise InputError(f"{path}: no 'mu'/'sigma' statistics (keys: {', '.join(data.files)})")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        _check_statistics(path, mu, sigma, POOL_DIM, ("mu", "sigma"))
        mu_s = sigma_s = None
        if "mu_s" in data.files and "sigma_s" in data.files:
            mu_s, sigma_s = data["mu_s"].astype(np.float64), data["sigma_s"].astype(np.float64)
            _check_statistics(path, mu_s, sigma_s, SPATIAL_DIM, ("mu_s", "sigma_s"))
    return SetStatistics(mu, sigma, mu_s, sigma_s, origin={"statistics_file": str(path)})


def statistics_cache_key(content_hash: str, weights_sha256: str) -> str:
    """Cache key: the set's pixels, the weights, and the protocol version."""
    text = f"{PROTOCOL_VERSION}|{weights_sha256}|{content_hash}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def set_statistics(source, extractor: InceptionFeatureExtractor, *, cache_dir: str | os.PathLike | None = None,
                   **extract_kwargs) -> SetStatistics:
    """Statistics and features of an image set, read from / written to ``cache_dir`` when given."""
    cache_file = None
    if cache_dir is not None:
        key = statistics_cache_key(source.content_hash, extractor.weights_sha256)
        cache_file = Path(cache_dir) / f"inception-stats-{key}.npz"
        if cache_file.is_file():
            with np.load(cache_file) as data:
                logits = data["logits"] if "logits" in data.files else None
                return SetStatistics(data["mu"], data["sigma"], data["mu_s"], data["sigma_s"], data["pool"], logits,
                                     int(data["count"]), {"cache_file": str(cache_file)})
    stats = SetStatistics.from_features(extract_features(source, extractor, **extract_kwargs))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu_s, sigma_s=stats.sigma_s, pool=stats.pool,
                      count=np.array(stats.count))
        if stats.logits is not None:
            arrays["logits"] = stats.logits
        temporary = cache_file.with_suffix(".tmp.npz")
        np.savez(temporary, **arrays)
        os.replace(temporary, cache_file)
        stats.origin["cache_file"] = str(cache_file)
    return stats


def reference_statistics(spec: str | os.PathLike, extractor: InceptionFeatureExtractor, *,
                         value_range: str | None = None, **kwargs) -> SetStatistics:
    """Reference set from a folder, a glob, an images ``.npz`` or an ADM statistics ``.npz``.

    An ADM reference batch holding both images and statistics uses its stored statistics for FID/sFID (as the
    ADM evaluator does) and its images' pool features for precision/recall.
    """
    text = str(spec)
    if text.endswith(".npz") and Path(text).is_file():
        with np.load(text) as data:
            keys = set(data.files)
        if "mu" in keys:
            stats = load_statistics_npz(text)
            if "arr_0" in keys:
                from_images = set_statistics(open_images(text, value_range), extractor, **kwargs)
                stats.pool, stats.count = from_images.pool, from_images.count
            return stats
    return set_statistics(open_images(text, value_range), extractor, **kwargs)

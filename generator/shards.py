"""On-disk token shards: the tokens, init geometry and labels of a dataset, encoded once by a tokenizer.

Both generator stages train on these files (the texture model on tokens + layout, the layout model on the
layout alone), and the sampler draws real layouts per class from them. Layout of a shard directory:

    index.json                 the plan (sizes, variants, tokenizer) and, once complete, `"complete": true`
    stats.json                 per-channel statistics for normalisation (written when the extraction finishes)
    shard_00000.tokens.npy     float32 (n, V, N, 5 + C)  tokens of each sample, V variants (original, hflip)
    shard_00000.layout.npy     float32 (n, V, N, 5)      init geometry (the entropy partition) of each variant
    shard_00000.labels.npy     int64   (n,)              class labels
    shard_00000.json           written last: marks the shard complete and holds its channel sums

Every shard but the last holds exactly `shard_size` samples, so sample i lives in shard `i // shard_size` at row
`i % shard_size`: finding a sample is O(1). Arrays are opened with `np.load(mmap_mode="r")`, lazily in each
process (and DataLoader worker), so a dataset of any size costs no memory up front.

Every file is written under a temporary name and renamed into place; a shard counts as done only once its
`.json` marker exists, so an interrupted extraction resumes by skipping the done shards.

Statistics (`stats.json`): the mean and (population) std of every token channel over all samples, variants and
tokens, with the 5 geometry channels taken as residuals over the init geometry (as the released generator
normalises them, SPEC.md section 7); plus the mean and std of the init geometry itself (the layout model's space).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .flow import GEOMETRY_DIM, TokenStats

__all__ = [
    "ShardError", "ShardPlan", "ShardStats", "TokenShards", "TokenShardDataset",
    "write_shard", "shard_is_done", "pending_shards", "finalize_shards", "write_plan",
]

INDEX_FILE = "index.json"
STATS_FILE = "stats.json"
FORMAT_NAME = "gpstoken-token-shards"
FORMAT_VERSION = 1
VARIANT_NAMES = ("original", "hflip")
MIN_STD = 1e-6


class ShardError(RuntimeError):
    """A shard directory is missing, incomplete, truncated or inconsistent (the message names the file)."""


@dataclass(frozen=True)
class ShardPlan:
    """What an extraction writes: fixed before the first shard, checked again when resuming."""

    num_samples: int
    shard_size: int
    num_tokens: int
    token_dim: int                      # 5 + C
    variants: tuple[str, ...] = ("original",)
    num_classes: int = 0                # labels lie in [0, num_classes)
    tile_size: int = 256                # side of the images (one tokenizer tile) ...
    min_size: int = 8                   # ... and the partition's min_size: what calibration needs to know
    tokenizer: str = ""                # free text describing the tokenizer (config name, weights file)

    def __post_init__(self) -> None:
        for key in ("num_samples", "shard_size", "num_tokens", "num_classes", "tile_size", "min_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"shard plan: {key} must be >= 1, got {getattr(self, key)}")
        if self.token_dim <= GEOMETRY_DIM:
            raise ValueError(f"shard plan: token_dim must be > {GEOMETRY_DIM}, got {self.token_dim}")
        if not self.variants or any(v not in VARIANT_NAMES for v in self.variants) or \
                len(set(self.variants)) != len(self.variants):
            raise ValueError(f"shard plan: variants must be distinct names from {VARIANT_NAMES}, got {self.variants}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, shard: int) -> range:
        """Sample indices of shard `shard`."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} outside [0, {self.num_shards})")
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_samples))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "num_samples": self.num_samples,
                "shard_size": self.shard_size, "num_tokens": self.num_tokens, "token_dim": self.token_dim,
                "variants": list(self.variants), "num_classes": self.num_classes, "tile_size": self.tile_size,
                "min_size": self.min_size, "tokenizer": self.tokenizer}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "ShardPlan":
        if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
            raise ShardError(f"{where}: not a token-shard index of format {FORMAT_NAME} v{FORMAT_VERSION}")
        try:
            return cls(num_samples=data["num_samples"], shard_size=data["shard_size"], num_tokens=data["num_tokens"],
                       token_dim=data["token_dim"], variants=tuple(data["variants"]),
                       num_classes=data["num_classes"], tile_size=data["tile_size"], min_size=data["min_size"],
                       tokenizer=data.get("tokenizer", ""))
        except (KeyError, TypeError, ValueError) as error:
            raise ShardError(f"{where}: malformed index ({error})") from error


@dataclass(frozen=True)
class ShardStats:
    """Normalisation statistics of a shard directory."""

    tokens: TokenStats                  # residual geometry + texture channels (the texture flow's space)
    layout_mean: tuple[float, ...]      # init geometry channels (the layout flow's space)
    layout_std: tuple[float, ...]
    count: int                          # tokens the statistics were computed over


def _shard_stem(directory: Path, shard: int) -> Path:
    return directory / f"shard_{shard:05d}"


def _array_path(directory: Path, shard: int, name: str) -> Path:
    return _shard_stem(directory, shard).with_suffix(f".{name}.npy")


def _marker_path(directory: Path, shard: int) -> Path:
    return _shard_stem(directory, shard).with_suffix(".json")


def _atomic_write_bytes(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _atomic_write_json(path: Path, data: Any) -> None:
    _atomic_write_bytes(path, lambda handle: handle.write(json.dumps(data, indent=1).encode()))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise ShardError(f"{path}: unreadable ({error})") from error


def write_plan(directory: str | Path, plan: ShardPlan) -> None:
    """Create the directory and its index, or check that an existing (resumed) one has the same plan."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        existing = ShardPlan.from_dict(_read_json(index), str(index))
        if existing != plan:
            raise ShardError(f"{index}: this directory holds a different extraction ({existing}); "
                             f"the new one is {plan}. Use another output directory.")
        return
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(index, {**plan.to_dict(), "complete": False})


def _channel_sums(tokens: np.ndarray, layout: np.ndarray) -> dict[str, list[float]]:
    residual = tokens.astype(np.float64)
    residual[..., :GEOMETRY_DIM] -= layout
    flat_tokens = residual.reshape(-1, residual.shape[-1])
    flat_layout = layout.reshape(-1, GEOMETRY_DIM).astype(np.float64)
    return {"token_sum": flat_tokens.sum(0).tolist(), "token_sumsq": (flat_tokens ** 2).sum(0).tolist(),
            "layout_sum": flat_layout.sum(0).tolist(), "layout_sumsq": (flat_layout ** 2).sum(0).tolist(),
            "count": int(flat_tokens.shape[0])}


def write_shard(directory: str | Path, plan: ShardPlan, shard: int, tokens: np.ndarray, layout: np.ndarray,
                labels: np.ndarray) -> None:
    """Write shard `shard` atomically: tokens (n, V, N, 5 + C), layout (n, V, N, 5), labels (n,)."""
    directory = Path(directory)
    count = len(plan.shard_range(shard))
    variants = len(plan.variants)
    expected = {"tokens": (count, variants, plan.num_tokens, plan.token_dim),
                "layout": (count, variants, plan.num_tokens, GEOMETRY_DIM), "labels": (count,)}
    arrays = {"tokens": np.ascontiguousarray(tokens, dtype=np.float32),
              "layout": np.ascontiguousarray(layout, dtype=np.float32),
              "labels": np.ascontiguousarray(labels, dtype=np.int64)}
    for name, array in arrays.items():
        if array.shape != expected[name]:
            raise ValueError(f"shard {shard}: {name} must have shape {expected[name]}, got {array.shape}")
    if not (np.isfinite(arrays["tokens"]).all() and np.isfinite(arrays["layout"]).all()):
        raise ValueError(f"shard {shard}: tokens or layout contain NaN/inf; the tokenizer output is broken")
    bad = (arrays["labels"] < 0) | (arrays["labels"] >= plan.num_classes)
    if bad.any():
        raise ValueError(f"shard {shard}: labels {sorted(set(arrays['labels'][bad].tolist()))[:10]} outside "
                         f"[0, {plan.num_classes})")
    for name, array in arrays.items():
        _atomic_write_bytes(_array_path(directory, shard, name), lambda handle, a=array: np.save(handle, a))
    _atomic_write_json(_marker_path(directory, shard),
                       {"shard": shard, "samples": count, **_channel_sums(arrays["tokens"], arrays["layout"])})


def shard_is_done(directory: str | Path, shard: int) -> bool:
    """True when shard `shard` was written completely (its marker exists)."""
    return _marker_path(Path(directory), shard).is_file()


def pending_shards(directory: str | Path, plan: ShardPlan) -> list[int]:
    """Shards not written yet, in order."""
    return [k for k in range(plan.num_shards) if not shard_is_done(directory, k)]


def _stats_from_sums(total: dict[str, np.ndarray], count: int) -> ShardStats:
    def mean_std(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        mean = total[f"{prefix}_sum"] / count
        var = np.maximum(total[f"{prefix}_sumsq"] / count - mean ** 2, 0.0)
        return mean, np.sqrt(var)

    token_mean, token_std = mean_std("token")
    layout_mean, layout_std = mean_std("layout")
    # A (numerically) constant channel, e.g. rho of the init geometry (always 0), gets std 1: normalising it
    # then only removes the mean instead of blowing rounding noise up.
    token_std = np.where(token_std > MIN_STD, token_std, 1.0)
    layout_std = np.where(layout_std > MIN_STD, layout_std, 1.0)
    return ShardStats(TokenStats(tuple(token_mean.tolist()), tuple(token_std.tolist())),
                      tuple(layout_mean.tolist()), tuple(layout_std.tolist()), count)


def finalize_shards(directory: str | Path) -> ShardStats:
    """Check every shard, aggregate the statistics into `stats.json` and mark the index complete."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    plan = ShardPlan.from_dict(_read_json(index), str(index))
    missing = pending_shards(directory, plan)
    if missing:
        raise ShardError(f"{directory}: cannot finalise, {len(missing)} shard(s) not written, first "
                         f"{_marker_path(directory, missing[0]).name}")
    total: dict[str, np.ndarray] = {}
    count = 0
    for shard in range(plan.num_shards):
        marker = _read_json(_marker_path(directory, shard))
        count += marker["count"]
        for key in ("token_sum", "token_sumsq", "layout_sum", "layout_sumsq"):
            total[key] = total.get(key, 0.0) + np.asarray(marker[key], dtype=np.float64)
    stats = _stats_from_sums(total, count)
    _atomic_write_json(directory / STATS_FILE, {
        "tokens": {"mean": list(stats.tokens.mean), "std": list(stats.tokens.std)},
        "layout": {"mean": list(stats.layout_mean), "std": list(stats.layout_std)},
        "count": count,
        "note": "geometry token channels are residuals over the init geometry; population statistics"})
    _atomic_write_json(index, {**plan.to_dict(), "complete": True})
    return stats


class TokenShards:
    """Read access to a complete shard directory; validated when opened, arrays memory-mapped lazily.

    `sample(i, variant)` -> (tokens (N, 5 + C), layout (N, 5), label) as numpy views of the memory map.
    Safe to hand to DataLoader workers: the memory maps are reopened in each process.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if not index.is_file():
            raise ShardError(f"{index}: no shard index here (run generator/extract_tokens.py first)")
        data = _read_json(index)
        self.plan = ShardPlan.from_dict(data, str(index))
        if not data.get("complete"):
            missing = pending_shards(self.directory, self.plan)
            first = _marker_path(self.directory, missing[0]).name if missing else STATS_FILE
            raise ShardError(f"{index}: the extraction is not finished ({len(missing)} shard(s) missing, first "
                             f"{first}); resume generator/extract_tokens.py")
        self._labels = np.concatenate([self._check_shard(k) for k in range(self.plan.num_shards)])
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def _check_shard(self, shard: int) -> np.ndarray:
        """Check the files of one shard (presence, size, shapes); returns its labels (read in full, small)."""
        plan, count = self.plan, len(self.plan.shard_range(shard))
        expected = {"tokens": ((count, len(plan.variants), plan.num_tokens, plan.token_dim), np.float32),
                    "layout": ((count, len(plan.variants), plan.num_tokens, GEOMETRY_DIM), np.float32),
                    "labels": ((count,), np.int64)}
        if not _marker_path(self.directory, shard).is_file():
            raise ShardError(f"{_marker_path(self.directory, shard)}: missing (shard {shard} incomplete)")
        labels = None
        for name, (shape, dtype) in expected.items():
            path = _array_path(self.directory, shard, name)
            if not path.is_file():
                raise ShardError(f"{path}: missing")
            try:
                array = np.load(path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as error:
                raise ShardError(f"{path}: unreadable or truncated ({error})") from error
            if array.shape != shape or array.dtype != dtype:
                raise ShardError(f"{path}: expected {np.dtype(dtype).name} {shape}, found {array.dtype} {array.shape}")
            header = path.stat().st_size - array.nbytes
            if header < 0 or array.offset != header:
                raise ShardError(f"{path}: truncated ({path.stat().st_size} bytes for {array.nbytes} bytes of data)")
            if name == "labels":
                labels = np.array(array)
        bad = (labels < 0) | (labels >= plan.num_classes)
        if bad.any():
            raise ShardError(f"{_array_path(self.directory, shard, 'labels')}: labels outside [0, {plan.num_classes})")
        return labels

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __len__(self) -> int:
        return self.plan.num_samples

    @property
    def labels(self) -> np.ndarray:
        """(num_samples,) int64 labels of all samples."""
        return self._labels

    @property
    def num_variants(self) -> int:
        return len(self.plan.variants)

    def stats(self) -> ShardStats:
        path = self.directory / STATS_FILE
        if not path.is_file():
            raise ShardError(f"{path}: missing (the extraction did not finish)")
        data = _read_json(path)
        return ShardStats(TokenStats(tuple(data["tokens"]["mean"]), tuple(data["tokens"]["std"])),
                          tuple(data["layout"]["mean"]), tuple(data["layout"]["std"]), int(data["count"]))

    def _array(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key not in self._maps:
            self._maps[key] = np.load(_array_path(self.directory, shard, name), mmap_mode="r")
        return self._maps[key]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row) of sample `index`."""
        if not 0 <= index < self.plan.num_samples:
            raise IndexError(f"sample {index} outside [0, {self.plan.num_samples})")
        return divmod(index, self.plan.shard_size)

    def sample(self, index: int, variant: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
        shard, row = self.locate(index)
        if not 0 <= variant < self.num_variants:
            raise IndexError(f"variant {variant} outside [0, {self.num_variants})")
        return (self._array(shard, "tokens")[row, variant], self._array(shard, "layout")[row, variant],
                int(self._labels[index]))

    def indices_of_class(self, label: int) -> np.ndarray:
        """Sample indices with class `label` (ascending)."""
        return np.flatnonzero(self._labels == label)


class TokenShardDataset(torch.utils.data.Dataset):
    """Training view of `TokenShards`: item -> dict(tokens (N, 5 + C), layout (N, 5), label) float32/int64.

    Indexed by `(index, draw_seed)` pairs (`tokenizer.engine.ShardedInfiniteSampler`) or plain ints. With
    several stored variants and `random_variant`, the draw seed picks one (the flip augmentation); a plain int
    reads the original.
    """

    def __init__(self, shards: TokenShards, random_variant: bool = True):
        self.shards = shards
        self.random_variant = random_variant

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, key: int | Sequence[int]) -> dict[str, torch.Tensor]:
        index, draw_seed = (key, None) if isinstance(key, (int, np.integer)) else key
        variant = 0
        if self.random_variant and draw_seed is not None and self.shards.num_variants > 1:
            variant = int(np.random.default_rng(int(draw_seed)).integers(self.shards.num_variants))
        tokens, layout, label = self.shards.sample(int(index), variant)
        return {"tokens": torch.from_numpy(np.array(tokens)), "layout": torch.from_numpy(np.array(layout)),
                "label": torch.tensor(label, dtype=torch.int64)}

"""Class-conditional image generation: labels -> layouts -> tokens -> pixels, and resumable sample runs.

Determinism. Sample i (a global index) has its label from the label plan, its layout from the layout source
(keyed by i), and its noise from `generator.samplers.sample_seeds(seed, [i])`; the layout model draws with its own
seed stream. So a sample depends on (seed, i) only: not on the batch it shares, nor on the number of processes.

Layout sources (`generator.layouts.LayoutSource`): the released `initg.pickle` (`generator.layouts.InitgLayouts`),
real layouts drawn per class from extracted shards (`ShardLayouts`), or the layout model followed by calibration
(`ModelLayouts`, the paper's two-stage method). The one-stage baseline has no layout.

A sample run (`run_sampling`) writes chunks of `chunk_size` samples, `chunks/chunk_00000.npz` (images, labels,
indices), each written atomically and skipped when it exists, so a killed run resumes where it stopped; the
processes of an `accelerate launch` take the pending chunks round-robin. At the end the chunks are merged into
one ADM-style `samples.npz` (`arr_0` uint8 NHWC, `arr_1` the labels, `labels` the same), and PNGs are written to
`images/` if asked. `run.json` records the settings; resuming with different settings is an error.
`save_layouts` writes the layouts every sample was given (`layouts.npz`), for eval's layout metrics.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenizer.images import to_uint8
from tokenizer.model import GPSToken

from .calibration import CalibratedLayouts, calibrate_layouts
from .config import SamplerConfig
from .layouts import LayoutSource
from .models import FlowTransformer
from .samplers import RowNoise, generate, sample_seeds
from .shards import TokenShards
from .spaces import JointSpace, LayoutSpace, TextureSpace

logger = logging.getLogger("gpstoken.sample")

__all__ = ["LAYOUT_SEED_OFFSET", "class_balanced_labels", "random_labels", "ShardLayouts", "ModelLayouts",
           "TokenGenerator", "SamplingRun", "run_sampling", "merge_chunks", "LAYOUTS_FILE", "save_layouts"]

LAYOUT_SEED_OFFSET = 0x5EED_1A70  # the layout model's noise stream: sample_seeds(seed + offset, indices)
LAYOUTS_FILE = "layouts.npz"      # next to samples.npz: the layouts the texture model was given (save_layouts)


def class_balanced_labels(per_class: int, num_classes: int) -> np.ndarray:
    """`per_class * num_classes` labels, sample i of class `i % num_classes` (the released convention)."""
    if per_class < 1 or num_classes < 1:
        raise ValueError(f"need per_class >= 1 and num_classes >= 1, got {per_class}, {num_classes}")
    return np.arange(per_class * num_classes, dtype=np.int64) % num_classes


def random_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """`num_samples` labels drawn uniformly from the classes, a function of the seed only."""
    if num_samples < 1 or num_classes < 1:
        raise ValueError(f"need num_samples >= 1 and num_classes >= 1, got {num_samples}, {num_classes}")
    return np.random.default_rng([seed, 0x1ABE1]).integers(num_classes, size=num_samples, dtype=np.int64)


class ShardLayouts:
    """Real layouts: sample i of class y gets the init geometry of a training image of class y, drawn with a
    generator seeded by (seed, i) (uniform over the class's images and their stored variants)."""

    def __init__(self, shards: TokenShards, seed: int = 0):
        self.shards, self.seed = shards, seed
        self.num_tokens = shards.plan.num_tokens
        order = np.argsort(shards.labels, kind="stable")
        bounds = np.searchsorted(shards.labels[order], np.arange(shards.plan.num_classes + 1))
        self._by_class = [order[bounds[c]:bounds[c + 1]] for c in range(shards.plan.num_classes)]

    def layouts(self, labels: Sequence[int], sample_ids: Sequence[int]) -> torch.Tensor:
        rows = []
        for label, index in zip(labels, sample_ids, strict=True):
            label = int(label)
            members = self._by_class[label] if 0 <= label < len(self._by_class) else ()
            if len(members) == 0:
                raise ValueError(f"the shards in {self.shards.directory} hold no image of class {label}")
            rng = np.random.default_rng([self.seed, int(index)])
            pick, variant = int(rng.integers(len(members))), int(rng.integers(self.shards.num_variants))
            rows.append(np.array(self.shards.sample(int(members[pick]), variant)[1]))
        return torch.from_numpy(np.stack(rows))


class ModelLayouts:
    """Stage 1 as a layout source: the layout model samples a layout per (label, index), calibration turns it
    into a valid tiling (`generator.calibration`), whose init geometry conditions the texture model."""

    def __init__(self, model: FlowTransformer, space: LayoutSpace, sampler: SamplerConfig, seed: int = 0,
                 tile_size: int = 256, min_size: int = 8):
        if model.config.layout_channels is not None or model.config.in_channels != space.channels:
            raise ValueError("ModelLayouts needs a layout model (no layout condition, 5 channels)")
        self.model, self.space, self.sampler = model, space, sampler
        self.seed, self.tile_size, self.min_size = seed, tile_size, min_size
        self.num_tokens = model.config.num_tokens
        self.exact = 0      # calibrated layouts that needed no correction beyond snapping (a quality signal)
        self.count = 0

    def sample(self, labels: Sequence[int], sample_ids: Sequence[int]) -> tuple[np.ndarray, CalibratedLayouts]:
        """(raw layouts (B, N, 5) in tile coordinates as the model made them, their calibration). The raw ones are
        what eval.layout's exact fraction is measured on (`save_layouts` keeps them)."""
        device = next(self.model.parameters()).device
        noise = RowNoise.from_seeds(sample_seeds(self.seed + LAYOUT_SEED_OFFSET, sample_ids), device)
        labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
        raw = self.space.to_layout(generate(self.model, labels, noise, None, self.sampler).samples).float()
        calibrated = calibrate_layouts(raw, tile_size=self.tile_size, min_size=self.min_size)
        self.exact += int(calibrated.exact.sum())
        self.count += len(calibrated.exact)
        return raw.cpu().numpy(), calibrated

    def layouts(self, labels: Sequence[int], sample_ids: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(self.sample(labels, sample_ids)[1].geometry)


class TokenGenerator:
    """Labels and global sample indices -> decodable tokens (texture stage with a layout source, or one-stage)."""

    def __init__(self, model: FlowTransformer, space: TextureSpace | JointSpace, sampler: SamplerConfig,
                 layouts: LayoutSource | None = None, seed: int = 0, compile: bool = False):
        if isinstance(space, TextureSpace) != (layouts is not None):
            raise ValueError("a texture model needs a layout source; a one-stage model takes none")
        if model.config.in_channels != space.channels:
            raise ValueError(f"the model generates {model.config.in_channels} channels, the token space has "
                             f"{space.channels}")
        self.model, self.space, self.sampler, self.layouts, self.seed = model, space, sampler, layouts, seed
        self.rows = 0   # network rows evaluated by the texture model (guidance accounting)
        # Compiled sampling: the model's own input checks sync with the host and break the graph; labels are
        # checked in `tokens` instead, and the sampler only feeds the network finite values of its own making.
        if compile:
            model.check_inputs = False
        self.network = torch.compile(model, dynamic=False) if compile else model

    @torch.no_grad()
    def tokens(self, labels: Sequence[int], sample_ids: Sequence[int]) -> torch.Tensor:
        num_classes = self.model.config.num_classes
        bad = [int(y) for y in labels if not 0 <= int(y) < num_classes]
        if bad:
            raise ValueError(f"labels {sorted(set(bad))[:10]} outside the model's {num_classes} classes")
        device = next(self.model.parameters()).device
        noise = RowNoise.from_seeds(sample_seeds(self.seed, sample_ids), device)
        label_tensor = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
        layout = None
        if self.layouts is not None:
            layout = self.layouts.layouts(labels, sample_ids).to(device=device, dtype=torch.float32)
        result = generate(self.network, label_tensor, noise, layout, self.sampler)
        self.rows += result.rows
        return self.space.to_tokens(result.samples.float(), layout)


@dataclass(frozen=True)
class SamplingRun:
    """Settings of one sample run (recorded in `run.json`, compared on resume)."""

    output_dir: str
    num_samples: int
    batch_size: int = 32
    chunk_size: int = 1000
    write_png: bool = False
    description: dict[str, Any] = dataclasses.field(default_factory=dict)  # generator, sampler, layouts, seed

    def chunk_range(self, chunk: int) -> range:
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.num_samples))

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)


def _chunk_path(output: Path, chunk: int) -> Path:
    return output / "chunks" / f"chunk_{chunk:05d}.npz"


def _save_npz_atomically(path: Path, **arrays: np.ndarray) -> None:
    temporary = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


def _save_png_atomically(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    temporary = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    Image.fromarray(image).save(temporary)
    os.replace(temporary, path)


def _check_run_record(run: SamplingRun, output: Path) -> None:
    record = {"num_samples": run.num_samples, "chunk_size": run.chunk_size, **run.description}
    path = output / "run.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != json.loads(json.dumps(record)):
            changed = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
            raise ValueError(f"{output} holds a sample run with other settings (differing: {changed}); "
                             "use another output folder")
        return
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def run_sampling(run: SamplingRun, labels: np.ndarray, generator: TokenGenerator, tokenizer: GPSToken,
                 accelerator=None) -> Path | None:
    """Generate `run.num_samples` images with labels `labels[i]`; resumable. Returns the merged `.npz` (main
    process) or None (other processes)."""
    output = Path(run.output_dir)
    if len(labels) != run.num_samples:
        raise ValueError(f"{len(labels)} labels for {run.num_samples} samples")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if rank == 0:
        _check_run_record(run, output)
        (output / "chunks").mkdir(exist_ok=True)
        if run.write_png:
            (output / "images").mkdir(exist_ok=True)
    if accelerator:
        accelerator.wait_for_everyone()
    pending = [k for k in range(run.num_chunks) if not _chunk_path(output, k).exists()]
    if accelerator:
        accelerator.wait_for_everyone()  # nobody writes before everybody listed the pending chunks
    mine = pending[rank::world]
    progress = tqdm(total=sum(len(run.chunk_range(k)) for k in mine), unit="img", desc=f"sample[{rank}]",
                    position=rank, dynamic_ncols=True)
    for chunk in mine:
        indices = np.asarray(run.chunk_range(chunk))
        images = []
        for start in range(0, len(indices), run.batch_size):
            batch = indices[start:start + run.batch_size]
            tokens = generator.tokens(labels[batch].tolist(), batch.tolist())
            with torch.no_grad():
                pixels = tokenizer.decode(tokens.to(next(tokenizer.parameters()).device))
            images.append(to_uint8(pixels))
            progress.update(len(batch))
        chunk_images = np.concatenate(images)
        if run.write_png:
            for index, image in zip(indices, chunk_images):
                _save_png_atomically(output / "images" / f"{index:06d}.png", image)
        _save_npz_atomically(_chunk_path(output, chunk), images=chunk_images, labels=labels[indices],
                             indices=indices)
    progress.close()
    if accelerator:
        accelerator.wait_for_everyone()
    if rank != 0:
        return None
    return merge_chunks(run)


def merge_chunks(run: SamplingRun) -> Path:
    """Concatenate the chunks in sample order into `samples.npz` (`arr_0` uint8 NHWC, `arr_1`/`labels`)."""
    output = Path(run.output_dir)
    images, labels = [], []
    for chunk in range(run.num_chunks):
        path = _chunk_path(output, chunk)
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; run the sampler again to finish it")
        with np.load(path) as data:
            if data["indices"].tolist() != list(run.chunk_range(chunk)):
                raise ValueError(f"{path}: holds samples {data['indices'][:3]}..., not chunk {chunk}")
            images.append(data["images"])
            labels.append(data["labels"])
    final = output / "samples.npz"
    all_labels = np.concatenate(labels)
    _save_npz_atomically(final, arr_0=np.concatenate(images), arr_1=all_labels, labels=all_labels)
    logger.info("wrote %s (%d samples)", final, run.num_samples)
    return final


def save_layouts(source: LayoutSource, labels: np.ndarray, path: str | Path, *, batch_size: int, tile_size: int,
                 min_size: int) -> Path:
    """Write the layouts of samples `0 .. len(labels) - 1` to `path` (npz, the input of `eval/fid.py --layouts`):
    `geometry` (B, N, 5) as the texture model got them, `labels`, `tile_size`, `min_size`, and for a layout model
    also `raw` (its output before calibration, from which eval measures the exact fraction).

    Why the layouts are drawn again rather than recorded while sampling: a source gives sample i the same layout
    whatever batch, process or resumed run asks (see the module docstring), so one pass over all indices after the
    run reproduces what every chunk used, including chunks written by other processes or by an earlier run; the
    price is one more layout pass, small next to texture sampling (benchmarks/two_stage.py). Batched matmuls may
    differ in the last bits from the sampling run's batches, which can only move a centre that sits on a snapping
    boundary."""
    geometry, raw = [], []
    for start in range(0, len(labels), batch_size):
        ids = list(range(start, min(start + batch_size, len(labels))))
        batch_labels = labels[ids].tolist()
        if isinstance(source, ModelLayouts):
            batch_raw, calibrated = source.sample(batch_labels, ids)
            raw.append(batch_raw)
            geometry.append(calibrated.geometry)
        else:
            geometry.append(source.layouts(batch_labels, ids).numpy())
    arrays = {"geometry": np.concatenate(geometry).astype(np.float32), "labels": np.asarray(labels, np.int64),
              "tile_size": np.int64(tile_size), "min_size": np.int64(min_size)}
    if raw:
        arrays["raw"] = np.concatenate(raw)
    path = Path(path)
    _save_npz_atomically(path, **arrays)
    return path

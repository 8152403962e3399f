"""Layout quality: how far generated token layouts are from real (entropy-partition) layouts, per class.

A layout is the init geometry ``(sigma_x, sigma_y, rho, mu_x, mu_y)`` of the N tokens of one tile. Each layout is
summarised by a fixed-length vector of fractions of its tokens (so layouts of different N compare):

- density: where the centres are, a histogram over a coarse ``grid x grid`` partition of the tile (row-major);
- size: ``log2 sqrt(sigma_x sigma_y)`` in ``size_bins`` equal bins over ``size_range`` (values beyond the range
  count in the end bins); for the 256/8 tiles, regions of 8 to 256 pixels give about -5.8 to -0.6;
- aspect: wide / square / tall by ``log2(sigma_x / sigma_y)`` below -1/2, within, above 1/2: how often squares
  were halved along x (tall halves) versus y (wide halves), which the entropy partition (SPEC.md section 3) decides
  per square by score and calibration reproduces from the predicted centres.

The distance is the Frechet distance between Gaussians fitted to these vectors (FID-style), computed for each class
present in both sets and for all layouts pooled. Like FID it is biased by the sample count, so compare numbers
obtained with the same numbers of layouts per class.

Generated layouts are, by default, raw layout-model output: they are calibrated here (generator.calibration) before
the statistics, since the calibrated layouts are what the texture model sees, and the report gives the fraction of
them that needed no correction beyond snapping (the snapped centres are exactly the centres of the calibrated
regions; see generator.calibration).

CLI: ``python -m eval.layout GEN.npz REAL.npz`` with arrays ``geometry`` (B, N, >=5) and ``labels`` (B,) in each file;
prints the report as JSON. ``eval/fid.py --layouts GEN REAL`` adds ``layout_metrics`` to a sample report.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from eval.metrics import feature_statistics, frechet_distance
from generator.calibration import calibrate_layouts

__all__ = ["layout_features", "layout_report", "layout_metrics", "main"]

ASPECT_BINS = 3


def layout_features(geometry, *, grid: int = 4, size_bins: int = 8,
                    size_range: tuple[float, float] = (-7.0, 0.0)) -> np.ndarray:
    """Per-layout statistics, float64 (B, grid*grid + size_bins + 3): density, log-size and aspect fractions.

    ``geometry``: (B, N, >=5) valid layouts (finite, sigma > 0); see the module docstring for the features.
    """
    geometry = np.asarray(geometry, dtype=np.float64)
    if geometry.ndim != 3 or geometry.shape[2] < 5 or geometry.shape[1] < 1:
        raise ValueError(f"geometry must have shape (B, N >= 1, >=5), got {geometry.shape}")
    if grid < 1 or size_bins < 1 or not size_range[0] < size_range[1]:
        raise ValueError(f"need grid >= 1, size_bins >= 1 and an increasing size_range, got {grid}, {size_bins}, "
                         f"{size_range}")
    geometry = geometry[..., :5]
    if not np.isfinite(geometry).all():
        raise ValueError("geometry contains NaN or infinite values")
    sigma = geometry[..., :2]
    if (sigma <= 0).any():
        raise ValueError(f"sigma must be positive, got minimum {sigma.min()} (calibrate raw layouts first)")

    batch, num_tokens = geometry.shape[:2]
    cell = np.clip(np.floor((geometry[..., 3:5] + 1) / 2 * grid), 0, grid - 1).astype(np.int64)
    density = cell[..., 1] * grid + cell[..., 0]
    log_size = 0.5 * np.log2(sigma[..., 0] * sigma[..., 1])
    size = np.clip(np.floor((log_size - size_range[0]) / (size_range[1] - size_range[0]) * size_bins), 0, size_bins - 1)
    log_aspect = np.log2(sigma[..., 0] / sigma[..., 1])
    aspect = (log_aspect >= -0.5).astype(np.int64) + (log_aspect > 0.5)

    bins = np.concatenate([density, grid * grid + size.astype(np.int64), grid * grid + size_bins + aspect], axis=1)
    width = grid * grid + size_bins + ASPECT_BINS
    flat = (np.arange(batch)[:, None] * width + bins).ravel()
    return np.bincount(flat, minlength=batch * width).reshape(batch, width) / num_tokens


def _labels(name: str, labels, batch: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (batch,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be {batch} integer class ids (one per layout), got {labels.dtype} "
                         f"{labels.shape}")
    return labels


def _distance(features1: np.ndarray, features2: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def layout_report(generated_geometry, real_geometry, labels_gen, labels_real, *, calibrate: bool = True,
                  tile_size: int = 256, min_size: int = 8, grid: int = 4, size_bins: int = 8) -> dict:
    """Distance between generated and real layouts, overall and per class, plus the calibration statistics.

    ``generated_geometry`` (B, N, >=5): raw layout-model output when ``calibrate`` (the default), else layouts to
    compare as they are. ``real_geometry`` (R, M, >=5): real layouts (entropy partitions), never calibrated.
    Returns a JSON-ready dict:
    ``frechet_distance`` (all layouts pooled), ``frechet_distance_per_class`` {class id (str): distance} for the
    classes with at least 2 layouts on both sides, ``frechet_distance_class_mean``, ``classes_skipped`` (the other
    classes present), ``num_generated``, ``num_real``, and when calibrating ``exact_fraction`` (layouts that
    needed no correction beyond snapping) and ``exact_fraction_per_class``.
    """
    if calibrate:
        calibrated = calibrate_layouts(generated_geometry, tile_size=tile_size, min_size=min_size)
        generated_geometry, exact = calibrated.geometry, calibrated.exact
    features_gen = layout_features(generated_geometry, grid=grid, size_bins=size_bins)
    features_real = layout_features(real_geometry, grid=grid, size_bins=size_bins)
    labels_gen = _labels("labels_gen", labels_gen, features_gen.shape[0])
    labels_real = _labels("labels_real", labels_real, features_real.shape[0])

    per_class, skipped = {}, []
    for label in np.union1d(labels_gen, labels_real).tolist():
        gen, real = features_gen[labels_gen == label], features_real[labels_real == label]
        if len(gen) >= 2 and len(real) >= 2:
            per_class[str(label)] = _distance(gen, real)
        else:
            skipped.append(label)
    report = {
        "frechet_distance": _distance(features_gen, features_real),
        "frechet_distance_per_class": per_class,
        "frechet_distance_class_mean": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
        "classes_skipped": skipped,
        "num_generated": int(features_gen.shape[0]),
        "num_real": int(features_real.shape[0]),
    }
    if calibrate:
        report["exact_fraction"] = float(exact.mean())
        report["exact_fraction_per_class"] = {str(label): float(exact[labels_gen == label].mean())
                                              for label in np.unique(labels_gen).tolist()}
    return report


def _load(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a layouts file; `geometry` and `labels` are required, `raw`, `tile_size`, `min_size` optional."""
    with np.load(path) as data:
        missing = {"geometry", "labels"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: missing array(s) {sorted(missing)}; expected 'geometry' (B, N, >=5) and "
                             f"'labels' (B,), found {data.files}")
        return {name: data[name] for name in data.files}


def layout_metrics(generated: str | Path, real: str | Path) -> dict:
    """The layout numbers of a sample run, for eval/fid.py's report (``--layouts GEN REAL``).

    ``generated``: the ``layouts.npz`` generator/sample.py writes next to its samples (``geometry``, ``labels``,
    ``tile_size``, ``min_size``, and ``raw`` when a layout model made them); ``real``: real layouts of held-out
    images (``geometry``, ``labels``). Raw layouts are calibrated here, the same calibration the sampler applied
    (so the compared geometry is the one the texture model got), because only they tell how many layouts needed
    no correction beyond snapping. Returns ``{"metrics": {layout_fd, layout_fd_class_mean[,
    layout_exact_fraction]}, "unavailable": {...}, "report": layout_report's dict}``.
    """
    gen, ref = _load(Path(generated)), _load(Path(real))
    has_raw = "raw" in gen
    grid = {"tile_size": int(gen["tile_size"]), "min_size": int(gen["min_size"])} if has_raw else {}
    report = layout_report(gen["raw"] if has_raw else gen["geometry"], ref["geometry"], gen["labels"],
                           ref["labels"], calibrate=has_raw, **grid)
    metrics = {"layout_fd": report["frechet_distance"], "layout_fd_class_mean": report["frechet_distance_class_mean"]}
    unavailable = {}
    if has_raw:
        metrics["layout_exact_fraction"] = report["exact_fraction"]
    else:
        unavailable["layout_exact_fraction"] = (f"{generated} holds no raw layout-model output (layouts from shards "
                                                "or initg are valid tilings already)")
    return {"metrics": metrics, "unavailable": unavailable, "report": report}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval.layout", description=__doc__.split("\n")[0])
    parser.add_argument("generated", type=Path, help="npz with 'geometry' (B, N, >=5) and 'labels' (B,)")
    parser.add_argument("real", type=Path, help="npz with the real layouts, same arrays")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="compare the generated layouts as they are (already calibrated)")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--min-size", type=int, default=8)
    parser.add_argument("--grid", type=int, default=4, help="density histogram grid per side")
    parser.add_argument("--size-bins", type=int, default=8)
    parser.add_argument("--out", type=Path, help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    try:
        gen, real = _load(args.generated), _load(args.real)
    except ValueError as error:
        raise SystemExit(str(error)) from error
    (gen, labels_gen), (real, labels_real) = (gen["geometry"], gen["labels"]), (real["geometry"], real["labels"])
    report = layout_report(gen, real, labels_gen, labels_real, calibrate=args.calibrate, tile_size=args.tile_size,
                           min_size=args.min_size, grid=args.grid, size_bins=args.size_bins)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

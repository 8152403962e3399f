"""The report of a pipeline run (`generator.pipeline`): one self-contained folder with `index.html`, the PNGs it
shows, and `metrics.json` holding the same numbers.

Why its own module: the pipeline decides what is computed, this module only how a finished run looks, so the
page can be rebuilt from a run folder without touching any model (`write_report`). Pictures are PNGs written with
PIL (matplotlib is not a dependency of the suite; `line_plot` draws the training curves). Every image the page
references is written next to it, and a tiny inline script puts "images loaded: k/n" into the page title, so a
headless browser can tell whether every picture loaded, and how tall the page is (`scripts/screenshot_report.py`).
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from tokenizer.engine import read_metrics
from tokenizer.viz import draw_tokens, image_grid

__all__ = ["METRIC_KEYS", "METRIC_LABELS", "line_plot", "write_report"]

#: Every number the report promises (the CI test checks each one is present and finite).
METRIC_KEYS = ("psnr", "ssim", "fid", "sfid", "precision", "recall", "layout_fd", "layout_exact_fraction")
METRIC_LABELS = {
    "psnr": "Reconstruction PSNR (dB, held-out test images)",
    "ssim": "Reconstruction SSIM (held-out test images)",
    "fid": "FID of the samples vs test images",
    "sfid": "sFID of the samples vs test images",
    "precision": "Precision (k = 3)",
    "recall": "Recall (k = 3)",
    "layout_fd": "Layout Frechet distance (layout model vs entropy partitions of test images)",
    "layout_exact_fraction": "Layouts that calibration reproduced exactly (fraction)",
}
_CURVE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))
_TITLE_SCRIPT = """<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var loaded = images.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.title = "images loaded: " + loaded + "/" + images.length +
                   "; page height: " + document.documentElement.scrollHeight;
});
</script>"""


# --------------------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------------------

def _nice(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, *, width: int = 440,
              height: int = 260, log_y: bool = False) -> np.ndarray:
    """A line chart as an uint8 (H, W, 3) image: one polyline per named (x, y) series, axes with the min/max
    values, a legend. `log_y` plots log10(y) (losses spanning decades); non-finite points are dropped."""
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    left, right, top, bottom = 56, width - 12, 24, height - 28
    draw.text((left, 6), title, fill="black")
    cleaned = {}
    for name, (xs, ys) in series.items():
        points = [(float(x), float(y)) for x, y in zip(xs, ys)
                  if math.isfinite(float(y)) and (not log_y or float(y) > 0)]
        if points:
            cleaned[name] = [(x, math.log10(y) if log_y else y) for x, y in points]
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    if not cleaned:
        draw.text((left + 8, (top + bottom) // 2), "no data", fill="gray")
        return np.asarray(canvas)
    every = [p for points in cleaned.values() for p in points]
    x0, x1 = min(p[0] for p in every), max(p[0] for p in every)
    y0, y1 = min(p[1] for p in every), max(p[1] for p in every)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    label = (lambda v: _nice(10 ** v)) if log_y else _nice
    draw.text((4, top - 4), label(y1), fill="black")
    draw.text((4, bottom - 8), label(y0), fill="black")
    draw.text((left, bottom + 6), _nice(x0), fill="black")
    draw.text((right - 40, bottom + 6), _nice(x1), fill="black")
    draw.text(((left + right) // 2 - 12, bottom + 6), "step", fill="gray")
    for number, (name, points) in enumerate(cleaned.items()):
        colour = _CURVE_COLOURS[number % len(_CURVE_COLOURS)]
        pixels = [to_pixel(x, y) for x, y in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        else:
            (px, py), = pixels
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((right - 150, top + 4 + 12 * number), name, fill=colour)
    return np.asarray(canvas)


def _enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    return np.kron(image, np.ones((scale, scale, 1), dtype=np.uint8))


def _save(folder: Path, name: str, image: np.ndarray) -> str:
    Image.fromarray(image).save(folder / name)
    return name


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------

def _metrics_rows(metrics: dict[str, float], unavailable: dict[str, str]) -> str:
    rows = []
    for key in METRIC_KEYS:
        if key in metrics:
            value = f"{metrics[key]:.4f}"
        else:
            value = "unavailable: " + html.escape(unavailable.get(key, "not computed"))
        rows.append(f"<tr><td>{html.escape(METRIC_LABELS[key])}</td><td><code>{key}</code></td><td>{value}</td></tr>")
    return "\n".join(rows)


def _curves(paths, folder: Path) -> list[str]:
    tokenizer = read_metrics(paths.stage("tokenizer"))
    layout, texture = read_metrics(paths.stage("layout")), read_metrics(paths.stage("texture"))

    def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
        chosen = [r for r in records if key in r]
        return [r["step"] for r in chosen], [r[key] for r in chosen]

    plots = [("curve_tokenizer_loss.png", {"pixel loss": series(tokenizer, "loss")}, "tokenizer: training loss", True),
             ("curve_tokenizer_psnr.png", {"held-out PSNR (dB)": series(tokenizer, "heldout_psnr")},
              "tokenizer: held-out PSNR", False),
             ("curve_generators_loss.png", {"layout model": series(layout, "loss"),
                                            "texture model": series(texture, "loss")},
              "flow matching: training loss", True)]
    return [_save(folder, name, line_plot(data, title, log_y=log_y)) for name, data, title, log_y in plots]


def write_report(paths, config) -> Path:
    """Write `<run>/report/index.html`, its PNGs and `metrics.json` from the finished stages of a run
    (`paths`: `generator.pipeline.RunPaths`, `config`: its `PipelineConfig`). Returns the page's path."""
    from .pipeline import STAGES, read_stage_marker

    folder = paths.report
    folder.mkdir(parents=True, exist_ok=True)
    evaluation = json.loads(paths.metrics.read_text())
    names: list[str] = evaluation["class_names"]
    metrics, unavailable = evaluation["metrics"], evaluation["unavailable"]

    examples = np.load(paths.examples)
    scale = max(1, 128 // examples["originals"].shape[1])
    recon_rows = []
    for i, label in enumerate(examples["labels"].tolist()):
        original = examples["originals"][i]
        panels = [_enlarge(original, scale), draw_tokens(original, examples["init_geometry"][i], scale=scale),
                  draw_tokens(original, examples["tokens"][i][:, :5], scale=scale),
                  _enlarge(examples["reconstructions"][i], scale)]
        image = _save(folder, f"reconstruction_{i:02d}.png", image_grid([panels]))
        recon_rows.append(f"<tr><td>{html.escape(names[label])}</td><td><img src=\"{image}\" alt=\"reconstruction "
                          f"{i}\"></td></tr>")

    with np.load(paths.samples) as data:
        samples, labels = data["arr_0"], data["labels"]
    sample_scale = max(1, 64 // samples.shape[1])
    per_class = config.sample.grid_per_class
    sample_rows = []
    for label, name in enumerate(names):
        chosen = samples[labels == label][:per_class]
        image = _save(folder, f"samples_{label:02d}.png", image_grid([[_enlarge(s, sample_scale) for s in chosen]]))
        sample_rows.append(f"<tr><td>{label}: {html.escape(name)}</td><td><img src=\"{image}\" "
                           f"alt=\"samples of {html.escape(name)}\"></td></tr>")

    curves = _curves(paths, folder)
    seconds = {s.name: (read_stage_marker(paths, s.name) or {}).get("seconds") for s in STAGES if s.name != "report"}
    timing_rows = "\n".join(f"<tr><td>{name}</td><td>{value:.0f} s</td></tr>" for name, value in seconds.items()
                            if value is not None)
    total = sum(v for v in seconds.values() if v is not None)
    counts = evaluation["counts"]
    summary = {"metrics": metrics, "unavailable": unavailable, "counts": counts,
               "stage_seconds": seconds, "class_names": names,
               "layout_fd_per_class": evaluation["layout_fd_per_class"],
               "tokenizer": {"num_tokens": config.tokenizer_model.num_tokens,
                             "tile_size": config.tokenizer_model.tile_size,
                             "render_size": config.tokenizer_model.render_size}}
    (folder / "metrics.json").write_text(json.dumps(summary, indent=1, allow_nan=False))

    tokens, tile = config.tokenizer_model.num_tokens, config.tokenizer_model.tile_size
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>GPSToken pipeline report</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:middle}} img{{image-rendering:pixelated}}</style>
{_TITLE_SCRIPT}
</head><body>
<h1>GPSToken on Fashion-MNIST</h1>
<p>Images are {tile}x{tile} tiles (28x28 scaled up), each turned into {tokens} Gaussian tokens. Stages: tokenizer,
token extraction, layout model, texture model, class-conditional sampling (layout model, calibration, texture
model, decoder), evaluation. Numbers: <a href="metrics.json">metrics.json</a>.</p>
<h2>Metrics</h2>
<table><tr><th>metric</th><th>key</th><th>value</th></tr>
{_metrics_rows(metrics, unavailable)}
</table>
<p>PSNR/SSIM over {counts['reconstruction_images']} test images; FID, sFID, precision and recall (ADM protocol,
TF-Inception, eval/README.md) of {counts['fid_samples']} samples ({counts['fid_samples'] // len(names)} per class)
against {counts['fid_reference_images']} test images: a small subset, so FID is biased upwards and only comparable
between runs of the same sizes.</p>
<h2>Class-conditional samples ({per_class} per class)</h2>
<table>{''.join(sample_rows)}</table>
<h2>Reconstructions of held-out images</h2>
<p>Columns: test image; its entropy partition (initial Gaussians); the encoder's refined Gaussians;
the reconstruction. Ellipses at 1 and 2 sigma, coloured by size (small warm, large cool).</p>
<table>{''.join(recon_rows)}</table>
<h2>Training curves</h2>
<p>{''.join(f'<img src="{c}" alt="{c}"> ' for c in curves)}</p>
<h2>Time per stage</h2>
<table>{timing_rows}<tr><td><b>total</b></td><td><b>{total:.0f} s</b></td></tr></table>
</body></html>
"""
    index = folder / "index.html"
    index.write_text(page, encoding="utf-8")
    return index

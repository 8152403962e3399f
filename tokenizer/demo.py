"""A look at GPS-tokens without any trained weights: the entropy partition of the bundled photos.

For each photo (scikit-image's and scikit-learn's public-domain samples, centre-cropped to 256x256) and each token
count, this writes
- the token overlay: every init Gaussian as its 1- and 2-sigma ellipse, coloured by size;
- a "Gaussian mosaic": each token textured with the mean colour of its region, rendered through the renderer
  (`splat_cuda.render`), then divided by the rendered total weight so the colours stay in range. It shows what the
  geometry alone can carry: dense small tokens where the photo is busy, few large ones where it is flat.
All pictures go into one grid per photo and an index page.

    python -m tokenizer.demo --output outputs/demo
"""
from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from splat_cuda import render
from tokenizer.images import fit_to_tiles, to_tensor, to_uint8
from tokenizer.partition import entropy_partition
from tokenizer.viz import draw_tokens, image_grid, save_png


def bundled_photos() -> dict[str, np.ndarray]:
    """The public-domain photos that ship with scikit-image and scikit-learn, as 256x256 uint8 RGB."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}
    for path, image in zip(load_sample_images().filenames, load_sample_images().images):
        photos[Path(path).stem] = image
    return {name: fit_to_tiles(image, 256, policy="crop", max_tiles=1) for name, image in photos.items()}


def region_mean_colours(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Mean colour in [-1, 1] of each region box (x0, y0, x1, y1 in [-1, 1], inclusive pixel ranges)."""
    pixels = to_tensor(image)
    height, width = image.shape[:2]
    cols = np.rint((boxes[:, [0, 2]] + 1) / 2 * (width - 1)).astype(int)
    rows = np.rint((boxes[:, [1, 3]] + 1) / 2 * (height - 1)).astype(int)
    return np.stack([pixels[:, r0:r1 + 1, c0:c1 + 1].mean(dim=(1, 2)).numpy()
                     for (c0, c1), (r0, r1) in zip(cols, rows)])


def gaussian_mosaic(image: np.ndarray, geometry: np.ndarray, boxes: np.ndarray, dmax: float = 3.0) -> np.ndarray:
    """Render init tokens textured with their region's mean colour, normalised by the total Gaussian weight."""
    colours = region_mean_colours(image, boxes)
    ones = np.ones((len(geometry), 1), dtype=np.float32)
    tokens = torch.from_numpy(np.concatenate([geometry, colours, ones], axis=1)).float()[None]
    rendered = render(tokens, image.shape[:2], dmax=dmax)[0]
    mosaic = rendered[:3] / rendered[3:].clamp_min(1e-6)
    return to_uint8(mosaic)


def run_demo(output: Path, token_counts=(64, 128, 256)) -> dict:
    """Write the overlays, mosaics and an index page for every bundled photo; returns the summary."""
    output.mkdir(parents=True, exist_ok=True)
    summary = {}
    photos = bundled_photos()
    for name, image in tqdm(photos.items(), desc="photos", unit="photo"):
        row_overlay, row_mosaic = [image], [image]
        for count in token_counts:
            part = entropy_partition(image, count)
            row_overlay.append(draw_tokens(image, part.geometry, scale=1))
            row_mosaic.append(gaussian_mosaic(image, part.geometry, part.boxes))
            summary.setdefault(name, {})[count] = {
                "smallest_sigma": float(part.geometry[:, :2].min()),
                "largest_sigma": float(part.geometry[:, :2].max()),
            }
        save_png(image_grid([row_overlay, row_mosaic]), output / f"{name}.png")
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    header = "".join(f"<th>{c} tokens</th>" for c in token_counts)
    rows = "".join(f"<h2>{html.escape(name)}</h2><img src='{html.escape(name)}.png'>" for name in photos)
    (output / "index.html").write_text(
        "<html><head><meta charset='utf-8'><title>GPS-token partition demo</title></head><body>"
        "<h1>Entropy partition of the bundled photos</h1>"
        f"<p>Columns: photo, then {', '.join(map(str, token_counts))} tokens. Top row: init Gaussians (1 and 2 sigma, "
        "coloured by size); bottom row: the same Gaussians textured with their region's mean colour and rendered "
        f"(normalised by total weight).</p><table><tr><th>photo</th>{header}</tr></table>{rows}</body></html>")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 256])
    args = parser.parse_args(argv)
    run_demo(args.output, tuple(args.tokens))
    print(f"wrote {args.output / 'index.html'}")


if __name__ == "__main__":
    main()

"""Reconstruct a set of images with a GPSToken and measure how close the reconstructions are.

    python -m tokenizer.reconstruct --weights GPSToken-M128.safetensors --config gpstoken_m128 \
        --input photos/ --output outputs/recon [--tokens 256] [--bias-box 40,60,120,140,400]

Inputs are folders (searched recursively), globs, `.txt` lists of paths, or files, of any size and PIL mode.
Each image is fitted to whole tiles (default: shortest side scaled to a multiple of the tile, then a centre crop to
a square; `--fit resize` scales instead, `--max-tiles` caps the side), tokenized (entropy partition + encoder, tiles
merged), decoded, and written as
- `recon/NAME.png`      the reconstruction;
- `compare/NAME.png`    input | reconstruction | token overlay, side by side;
- `overlay/NAME.png`    the tokens as 1- and 2-sigma ellipses over the input;
- `metrics.json`        PSNR and SSIM per image and their means (definitions in README.md, "Metrics"), plus the
                        files that were skipped (not images) or unreadable, with the reason.
Files that are not images are skipped with a count and unreadable images are reported; the run goes on.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from eval.metrics import psnr, ssim
from tokenizer.images import ImageReadError, collect_images, fit_to_tiles, read_image, to_uint8
from tokenizer.model import GPSToken
from tokenizer.official import load_released
from tokenizer.partition import bias_from_boxes
from tokenizer.viz import draw_tokens, image_grid, save_png

log = logging.getLogger("tokenizer.reconstruct")


def square_tiles(image: np.ndarray, tile: int, policy: str, max_tiles: int | None) -> np.ndarray:
    """Fit an image to whole tiles and crop it to a centred square (the tokenizer merges np x np tiles)."""
    fitted = fit_to_tiles(image, tile, policy=policy, max_tiles=max_tiles)
    side = min(fitted.shape[:2])
    top, left = (fitted.shape[0] - side) // 2, (fitted.shape[1] - side) // 2
    return fitted[top:top + side, left:left + side]


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Output names from file stems; repeated stems get `_2`, `_3`, ... in input order."""
    seen: dict[str, int] = defaultdict(int)
    names = []
    for path in paths:
        seen[path.stem] += 1
        names.append(path.stem if seen[path.stem] == 1 else f"{path.stem}_{seen[path.stem]}")
    return names


def reconstruct_files(model: GPSToken, paths: Sequence[Path], output: Path, *, num_tokens: int | None = None,
                      bias_boxes: Sequence[tuple[float, float, float, float, float]] = (), fit: str = "crop",
                      max_tiles: int | None = None, batch_size: int = 4) -> dict:
    """Reconstruct every readable image of `paths` into `output`; returns the metrics written to metrics.json."""
    for sub in ("recon", "compare", "overlay"):
        (output / sub).mkdir(parents=True, exist_ok=True)
    tile = model.config.tile_size
    per_image, unreadable = {}, {}
    # Group by fitted size so that a batch holds images of one shape; read lazily, one batch at a time.
    pending: dict[int, list[tuple[str, np.ndarray]]] = defaultdict(list)

    def flush(side: int) -> None:
        batch = pending.pop(side)
        images = np.stack([image for _, image in batch])
        bias = bias_from_boxes(side, side, bias_boxes) if bias_boxes else None
        tokenization = model.tokenize(images, num_tokens=num_tokens, bias=bias)
        recon = to_uint8(model.decode(tokenization.tokens, tokenization.tiles_per_side))
        psnrs, ssims = psnr(recon, images), ssim(recon, images)
        for (name, image), rec, tokens, p, s in zip(batch, recon, tokenization.tokens.cpu().numpy(), psnrs, ssims):
            overlay = draw_tokens(image, tokens[:, :5], scale=1)
            save_png(rec, output / "recon" / f"{name}.png")
            save_png(overlay, output / "overlay" / f"{name}.png")
            save_png(image_grid([[image, rec, overlay]]), output / "compare" / f"{name}.png")
            per_image[name] = {"psnr": float(p), "ssim": float(s), "size": side,
                               "tokens": int(tokens.shape[0])}

    for name, path in tqdm(list(zip(unique_names(paths), paths)), desc="reconstruct", unit="img"):
        try:
            image = square_tiles(read_image(path), tile, fit, max_tiles)
        except ImageReadError as err:
            unreadable[str(path)] = str(err)
            log.warning("skipping %s", err)
            continue
        side = image.shape[0]
        pending[side].append((name, image))
        if len(pending[side]) == batch_size:
            flush(side)
    for side in list(pending):
        flush(side)
    mean = {key: float(np.mean([m[key] for m in per_image.values()])) if per_image else None
            for key in ("psnr", "ssim")}
    return {"mean": mean, "count": len(per_image), "per_image": per_image, "unreadable": unreadable}


def parse_bias_box(text: str) -> tuple[float, float, float, float, float]:
    """`x0,y0,x1,y1,weight` in pixels of the fitted image (inclusive-exclusive)."""
    parts = text.split(",")
    if len(parts) != 5:
        raise argparse.ArgumentTypeError(f"--bias-box wants x0,y0,x1,y1,weight, got '{text}'")
    try:
        return tuple(float(p) for p in parts)  # type: ignore[return-value]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bias-box has a non-number in '{text}'") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, type=Path, help="checkpoint (.safetensors, .pt, .ckpt)")
    parser.add_argument("--config", required=True, help="model config: shipped name (gpstoken_m128) or YAML path")
    parser.add_argument("--input", required=True, nargs="+", help="folders, globs, .txt lists or image files")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per tile (default: the config's)")
    parser.add_argument("--bias-box", type=parse_bias_box, action="append", default=[],
                        help="steer tokens into a box: x0,y0,x1,y1,weight (pixels; repeatable)")
    parser.add_argument("--fit", choices=("crop", "resize"), default="crop")
    parser.add_argument("--max-tiles", type=int, default=None, help="cap the tiles per side")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.weights.is_file():
        raise SystemExit(f"reconstruct: weights file not found: {args.weights}")
    paths, skipped = collect_images(args.input)
    if skipped:
        log.info("skipped %d file(s) that are not images (first: %s)", len(skipped), skipped[0])
    if not paths:
        raise SystemExit(f"reconstruct: no images found in {' '.join(args.input)}")
    model = load_released(args.weights, args.config, device=args.device)
    result = reconstruct_files(model, paths, args.output, num_tokens=args.tokens, bias_boxes=args.bias_box,
                               fit=args.fit, max_tiles=args.max_tiles, batch_size=args.batch_size)
    result["skipped_non_images"] = [str(p) for p in skipped]
    (args.output / "metrics.json").write_text(json.dumps(result, indent=1))
    if result["count"] == 0:
        raise SystemExit(f"reconstruct: none of the {len(paths)} image file(s) could be read "
                         f"(see {args.output / 'metrics.json'})")
    mean = result["mean"]
    print(f"{result['count']} image(s): PSNR {mean['psnr']} dB, SSIM {mean['ssim']} -> {args.output}")
    return result


if __name__ == "__main__":
    main()

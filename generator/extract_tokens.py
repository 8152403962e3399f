"""Encode a labelled image dataset once with a trained tokenizer into token shards for generator training.

    accelerate launch generator/extract_tokens.py --tokenizer gpstoken_m128 --tokenizer-weights m128_ema.safetensors \
        --source folder --data /data/imagenet/train --output /data/in1k_m128_tokens

    python generator/extract_tokens.py --tokenizer TOKENIZER.yaml --tokenizer-weights TOKENIZER.safetensors \
        --source fashion_mnist --output outputs/fashion_tokens

Stores tokens, init geometry and labels (plus a horizontally mirrored copy unless --no-hflip), then writes the
per-channel statistics (geometry as residuals over the init geometry). Rerun the same command to resume: finished
shards are skipped. Layout and format: generator/shards.py; pipeline: generator/extraction.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.extraction import ExtractionSettings, extract_tokens, open_labelled_images  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="tokenizer config name (gpstoken_m128) or YAML")
    parser.add_argument("--tokenizer-weights", required=True,
                        help="trained tokenizer weights: its EMA export, or a released checkpoint (EMA preferred)")
    parser.add_argument("--source", choices=("folder", "list", "fashion_mnist"), default="folder")
    parser.add_argument("--data", default="", help="image folder (one sub-folder per class), .txt list, or the "
                        "Fashion-MNIST folder (default /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="Fashion-MNIST split")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    parser.add_argument("--output", required=True, help="shard directory")
    parser.add_argument("--no-hflip", action="store_true", help="do not store a mirrored copy of each image")
    parser.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers (they run the partition)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator

    from tokenizer.official import load_released

    args = build_parser().parse_args(argv)
    accelerator = Accelerator()
    tokenizer = load_released(args.tokenizer_weights, args.tokenizer, prefer_ema=True).to(accelerator.device).eval()
    images, class_names = open_labelled_images(args.source, args.data, tokenizer.config.tile_size, split=args.split,
                                               limit=args.limit)
    settings = ExtractionSettings(args.output, shard_size=args.shard_size, batch_size=args.batch_size,
                                  num_workers=args.workers, hflip=not args.no_hflip,
                                  tokenizer_description=f"{args.tokenizer} {args.tokenizer_weights}")
    stats = extract_tokens(tokenizer, images, len(class_names), settings, accelerator)
    if accelerator.is_main_process:
        (Path(args.output) / "classes.json").write_text(json.dumps(class_names, indent=0))
        print(f"{args.output}: {len(images)} images of {len(class_names)} classes, token statistics in stats.json "
              f"({stats.count} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

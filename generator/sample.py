"""Generate class-conditional images: (layout model ->) calibration -> texture model -> tokenizer decode.

    accelerate launch generator/sample.py --generator released_sit_xl.safetensors \
        --tokenizer gpstoken_m128 --tokenizer-weights m128.safetensors --layout initg --initg initg.pickle \
        --per-class 50 --output samples/two_stage [--fid-reference VIRTUAL_imagenet256_labeled.npz]

--generator: a training run directory of generator/train_dit.py (EMA weights, its statistics) or the released
SiT-XL-gs file (released M128 statistics). Layouts (--layout): `initg` (the released initg.pickle), `shards`
(real layouts per class from extracted token shards), `model` (a layout-model run directory, then calibration:
the two-stage method), or `none` (one-stage models). The default sampler is the released one: SDE, 250 steps,
guidance 1.5 for t >= 0.2. Output: chunks (resumable), `samples.npz` (ADM layout: `arr_0` uint8 NHWC, `arr_1`
labels), with a layout source `layouts.npz` (the layouts used, for `eval/fid.py --layouts`), optional PNGs,
optional FID against a reference (eval.evaluate). See generator/sampling.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.config import SAMPLING_METHODS, SamplerConfig  # noqa: E402
from generator.flow import M128_TOKEN_STATS  # noqa: E402
from generator.layouts import InitgLayouts  # noqa: E402
from generator.sampling import (LAYOUTS_FILE, ModelLayouts, SamplingRun, ShardLayouts,  # noqa: E402
                                TokenGenerator, class_balanced_labels, random_labels, run_sampling, save_layouts)
from generator.shards import TokenShards  # noqa: E402
from generator.spaces import LayoutSpace, TextureSpace  # noqa: E402

LAYOUT_CHOICES = ("initg", "shards", "model", "none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", required=True, help="texture/one-stage run directory, or the released file")
    parser.add_argument("--generator-weights", help="weights inside the run directory (default ema.safetensors)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer config name or YAML")
    parser.add_argument("--tokenizer-weights", required=True, help="tokenizer weights (EMA or released)")
    parser.add_argument("--output", required=True)
    count = parser.add_mutually_exclusive_group(required=True)
    count.add_argument("--per-class", type=int, help="class-balanced: this many samples of every class")
    count.add_argument("--num-samples", type=int, help="this many samples with random labels")
    parser.add_argument("--num-classes", type=int, help="classes to draw from (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=1000, help="samples per resumable chunk")
    parser.add_argument("--png", action="store_true", help="also write images/<index>.png")
    parser.add_argument("--method", choices=SAMPLING_METHODS, default="sde")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (1: none)")
    parser.add_argument("--guidance-low", type=float, default=0.2, help="guide only for t >= this")
    parser.add_argument("--guidance-high", type=float, default=1.0, help="guide only for t <= this")
    parser.add_argument("--layout", choices=LAYOUT_CHOICES, help="layout source (default: none for one-stage "
                        "models; required for texture models)")
    parser.add_argument("--initg", help="the released initg.pickle (--layout initg)")
    parser.add_argument("--initg-cycle", action="store_true", help="reuse initg layouts when a class runs out")
    parser.add_argument("--shards", help="token shard directory (--layout shards)")
    parser.add_argument("--layout-weights", help="layout-model run directory (--layout model)")
    parser.add_argument("--layout-method", choices=SAMPLING_METHODS, default="euler")
    parser.add_argument("--layout-steps", type=int, default=5)
    parser.add_argument("--layout-guidance", type=float, default=1.0)
    parser.add_argument("--layout-guidance-low", type=float, default=0.0)
    parser.add_argument("--layout-guidance-high", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the texture model (GPU sampling)")
    parser.add_argument("--fid-reference", help="reference images/statistics for eval's FID (optional)")
    parser.add_argument("--inception-weights", help="TF-Inception weights for the FID")
    return parser


def _load_generator(args, device):
    path = Path(args.generator)
    if path.is_dir():
        from generator.training import load_trained

        model, space, _ = load_trained(path, args.generator_weights, device)
        return model, space
    from generator.official import load_released_generator

    return load_released_generator(path, map_location=device), TextureSpace(M128_TOKEN_STATS)


def _layout_source(args, parser, space, tokenizer_config, device):
    choice = args.layout or ("model" if args.layout_weights else None)
    if isinstance(space, TextureSpace) and choice in (None, "none"):
        parser.error("a texture model needs --layout initg|shards|model")
    if not isinstance(space, TextureSpace) and choice not in (None, "none"):
        parser.error(f"a {space.stage} model takes no layout (--layout {choice})")
    if choice == "initg":
        if not args.initg:
            parser.error("--layout initg needs --initg FILE")
        return InitgLayouts.from_pickle(args.initg, cycle=args.initg_cycle), {"initg": args.initg}
    if choice == "shards":
        if not args.shards:
            parser.error("--layout shards needs --shards DIR")
        return ShardLayouts(TokenShards(args.shards), args.seed), {"shards": args.shards}
    if choice == "model":
        if not args.layout_weights:
            parser.error("--layout model needs --layout-weights RUN_DIR")
        from generator.training import load_trained

        model, layout_space, _ = load_trained(args.layout_weights, device=device)
        if not isinstance(layout_space, LayoutSpace):
            parser.error(f"{args.layout_weights} is a {layout_space.stage} run, not a layout model")
        sampler = SamplerConfig(method=args.layout_method, num_steps=args.layout_steps,
                                guidance_scale=args.layout_guidance, guidance_low=args.layout_guidance_low,
                                guidance_high=args.layout_guidance_high)
        source = ModelLayouts(model, layout_space, sampler, args.seed, tile_size=tokenizer_config.tile_size,
                              min_size=tokenizer_config.partition_min_size)
        return source, {"layout_model": args.layout_weights, "layout_sampler": sampler.__dict__}
    return None, {}


def main(argv: list[str] | None = None) -> int:
    import torch
    from accelerate import Accelerator

    from tokenizer.official import load_released

    parser = build_parser()
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # CPU processes of a launch then talk through gloo
    device = accelerator.device
    model, space = _load_generator(args, device)
    tokenizer = load_released(args.tokenizer_weights, args.tokenizer).to(device).eval()
    if tokenizer.config.token_dim != space.channels:
        parser.error(f"the generator makes tokens of {space.channels} numbers, the tokenizer decodes "
                     f"{tokenizer.config.token_dim}")
    layouts, layout_description = _layout_source(args, parser, space, tokenizer.config, device)
    num_classes = args.num_classes or model.config.num_classes
    if not 1 <= num_classes <= model.config.num_classes:
        parser.error(f"--num-classes {num_classes} outside the model's 1..{model.config.num_classes} classes")
    if args.per_class is not None:
        labels, label_mode = class_balanced_labels(args.per_class, num_classes), "balanced"
    else:
        labels, label_mode = random_labels(args.num_samples, num_classes, args.seed), "random"
    sampler = SamplerConfig(method=args.method, num_steps=args.steps, guidance_scale=args.guidance,
                            guidance_low=args.guidance_low, guidance_high=args.guidance_high)
    generator = TokenGenerator(model, space, sampler, layouts, args.seed, compile=args.compile)
    run = SamplingRun(args.output, len(labels), args.batch_size, args.chunk_size, args.png, description={
        "generator": str(args.generator), "tokenizer": str(args.tokenizer_weights), "seed": args.seed,
        "labels": label_mode, "num_classes": num_classes, "sampler": sampler.__dict__, **layout_description})
    samples = run_sampling(run, labels, generator, tokenizer, accelerator)
    if samples is None:
        return 0
    print(f"samples: {samples}")
    if layouts is not None:
        path = save_layouts(layouts, labels, Path(args.output) / LAYOUTS_FILE, batch_size=args.batch_size,
                            tile_size=tokenizer.config.tile_size, min_size=tokenizer.config.partition_min_size)
        print(f"layouts: {path}")
    if args.fid_reference:
        from eval.evaluate import evaluate_samples

        report = evaluate_samples(samples, args.fid_reference, weights_path=args.inception_weights,
                                  device=str(device))
        (Path(args.output) / "metrics.json").write_text(json.dumps(report, indent=1))
        print(f"FID {report['metrics'].get('fid')}  (metrics.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

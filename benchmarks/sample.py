"""Sampling throughput with the released setting: images/s per GPU and model FLOP utilisation.

    python benchmarks/sample.py [--batch 256] [--batches 3] [--steps 250] [--device cuda] [--out results.json]

SiT-XL texture model (random weights, bf16 autocast) + GPSToken-M128 decoder (random weights), the released
sampler: Euler-Maruyama SDE, 250 steps, guidance 1.5 for t >= 0.2 (unconditional rows only inside the interval),
layouts from a fixed bank of valid tilings, decode included. MFU counts the generator's network rows
(`TokenGenerator.rows`) x forward FLOPs per row; the decoder's work is reported as time only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from dit_train import H200_BF16_PEAK, forward_flops  # noqa: E402

from generator.calibration import calibrate_layouts  # noqa: E402
from generator.config import SamplerConfig  # noqa: E402
from generator.flow import M128_TOKEN_STATS  # noqa: E402
from generator.layouts import InitgLayouts  # noqa: E402
from generator.models import build_model  # noqa: E402
from generator.official import released_config  # noqa: E402
from generator.sampling import TokenGenerator  # noqa: E402
from generator.spaces import TextureSpace  # noqa: E402
from tokenizer.model import GPSToken  # noqa: E402


def layout_bank(per_class: int = 4, classes: int = 1000) -> InitgLayouts:
    rng = np.random.default_rng(0)
    centres = np.concatenate([np.zeros((per_class * classes, 128, 3)), rng.uniform(-1, 1, (per_class * classes, 128, 2))], -1)
    geometry = calibrate_layouts(centres).geometry
    return InitgLayouts({c: list(geometry[c * per_class:(c + 1) * per_class]) for c in range(classes)}, cycle=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=3, help="timed batches (after one warm-up batch)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/sample_results.json")
    parser.add_argument("--compile", action="store_true", help="torch.compile the texture model")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = released_config()
    model = build_model(config).to(device).eval()
    tokenizer = GPSToken.from_config_name("gpstoken_m128").to(device).eval()
    sampler = SamplerConfig(method="sde", num_steps=args.steps, guidance_scale=1.5, guidance_low=0.2)
    generator = TokenGenerator(model, TextureSpace(M128_TOKEN_STATS), sampler, layout_bank(), seed=0,
                               compile=args.compile)

    def one_batch(first: int) -> None:
        indices = list(range(first, first + args.batch))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            tokens = generator.tokens([i % 1000 for i in indices], indices)
        with torch.no_grad():
            tokenizer.decode(tokens.float())

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    one_batch(0)
    generator.rows = 0
    synchronise()
    start = time.perf_counter()
    for b in range(args.batches):
        one_batch((b + 1) * args.batch)
    synchronise()
    elapsed = time.perf_counter() - start
    images = args.batch * args.batches
    achieved = generator.rows * forward_flops(config, 128) / elapsed
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "batch": args.batch, "steps": args.steps, "guidance": [1.5, 0.2, 1.0], "images": images,
              "seconds": elapsed, "images_per_s": images / elapsed, "network_rows_per_image": generator.rows / images,
              "generator_tflops_per_s": achieved / 1e12, "mfu": achieved / H200_BF16_PEAK}
    print(json.dumps(result))
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput of the released-size texture model: images/s per GPU and model FLOP utilisation.

    python benchmarks/dit_train.py --gpus 1 2 4 [--batch 256] [--steps 60] [--compile] [--out results.json]

Runs the real trainer (`accelerate launch generator/train_dit.py --config configs/dit_xl_m128.yaml`: SiT-XL, 128
tokens, bf16 autocast, gradient clipping, EMA, the shard DataLoader) on synthetic token shards written here, so
everything but the tokenizer is included. Throughput is read from the run's metrics.jsonl (the engine's
images_per_s, all processes together) after the warm-up steps; MFU = achieved model FLOPs / (GPUs x peak).
Model FLOPs per image = 3 x forward (forward + backward), forward counted from the config (matmuls of the blocks,
attention scores, embedders and final layer; elementwise work ignored).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from generator.config import ModelConfig  # noqa: E402
from generator.shards import ShardPlan, finalize_shards, write_plan, write_shard  # noqa: E402
from tokenizer.engine import read_metrics  # noqa: E402

H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of one H200 (SXM)


def forward_flops(config: ModelConfig, num_tokens: int) -> float:
    """Multiply-add FLOPs (x2) of one forward pass for one sample."""
    d, n = config.hidden_size, num_tokens
    hidden = int(d * config.mlp_ratio)
    per_block = n * (2 * d * 3 * d + 2 * d * d + 2 * 2 * d * hidden) + 2 * 2 * n * n * d + 2 * d * 6 * d
    embed = n * 2 * config.in_channels * d + (n * (2 * 5 * d + 2 * d * d) if config.layout_channels else 0)
    final = n * 2 * d * config.in_channels * (2 if config.learn_sigma else 1) + 2 * d * 2 * d
    timestep = 2 * config.frequency_embedding_size * d + 2 * d * d
    return float(config.depth * per_block + embed + final + timestep)


def synthetic_shards(directory: Path, samples: int, num_tokens: int = 128, channels: int = 21) -> None:
    plan = ShardPlan(num_samples=samples, shard_size=4096, num_tokens=num_tokens, token_dim=channels,
                     variants=("original", "hflip"), num_classes=1000, tokenizer="synthetic")
    write_plan(directory, plan)
    rng = np.random.default_rng(0)
    for shard in range(plan.num_shards):
        count = len(plan.shard_range(shard))
        layout = np.concatenate([rng.uniform(0.02, 0.3, (count, 2, num_tokens, 2)), np.zeros((count, 2, num_tokens, 1)),
                                 rng.uniform(-1, 1, (count, 2, num_tokens, 2))], axis=-1)
        tokens = np.concatenate([layout + 0.01 * rng.standard_normal(layout.shape),
                                 rng.standard_normal((count, 2, num_tokens, channels - 5))], axis=-1)
        write_shard(directory, plan, shard, tokens, layout, rng.integers(0, 1000, count))
    finalize_shards(directory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=256, help="images per GPU per step")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20, help="steps excluded from the measurement")
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default="benchmarks/dit_train_results.json")
    args = parser.parse_args()
    config = ModelConfig.sized("XL", num_tokens=128, in_channels=21, num_classes=1000, layout_channels=5)
    train_flops = 3 * forward_flops(config, 128)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        shards = Path(scratch) / "shards"
        synthetic_shards(shards, samples=max(args.gpus) * args.batch * 8)
        for gpus in args.gpus:
            run = Path(scratch) / f"run_{gpus}"
            command = ["accelerate", "launch", "--num_processes", str(gpus), "--mixed_precision", "bf16",
                       str(REPO / "generator" / "train_dit.py"), "--config", str(REPO / "configs" / "dit_xl_m128.yaml"),
                       f"data.shards={shards}", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
                       f"engine.output_dir={run}", f"engine.max_steps={args.steps}", "engine.log_every=10",
                       f"engine.checkpoint_every={10 * args.steps}", "preview.every=0",
                       f"engine.compile={'true' if args.compile else 'false'}"]
            subprocess.run(command, check=True, cwd=REPO)
            records = [r for r in read_metrics(run) if r["step"] > args.warmup and "images_per_s" in r]
            total = float(np.median([r["images_per_s"] for r in records]))
            per_gpu = total / gpus
            results.append({"gpus": gpus, "batch_per_gpu": args.batch, "compile": args.compile,
                            "images_per_s": total, "images_per_s_per_gpu": per_gpu,
                            "mfu": per_gpu * train_flops / H200_BF16_PEAK,
                            "train_gflops_per_image": train_flops / 1e9})
            print(json.dumps(results[-1]))
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

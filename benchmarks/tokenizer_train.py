"""Tokenizer training throughput: images/s and peak GPU memory at M128, batch 16 per GPU, all four losses
(loss networks with random weights: `losses.random_init=true`), fp32 and bf16, on 1, 2 and 4 GPUs.

Each cell is a real `tokenizer/train.py` run under `accelerate launch` on random 256 crops of the bundled
photos (partition in loader workers), GAN on from step 0 (tokenizer and discriminator steps alternate, as
released); the figure is the mean `images_per_s` logged over the steps after `--warmup`, so data loading
counts. Writes a Markdown table (stdout and `--table`).

    python benchmarks/tokenizer_train.py --gpus 1 2 4 --steps 60 --table benchmarks/RESULTS_tokenizer_train.md
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cell(gpus: int, precision: str, steps: int, warmup: int, workers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as output:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                   "--num_processes", str(gpus), "--mixed_precision", precision, "--dynamo_backend", "no",
                   *(["--multi_gpu"] if gpus > 1 else []),
                   str(REPO / "tokenizer" / "train.py"), "--config", str(REPO / "configs" / "train_gpstoken_m128.yaml"),
                   f"engine.output_dir={output}", f"engine.max_steps={steps}", f"engine.mixed_precision={precision}",
                   "engine.log_every=10", f"engine.checkpoint_every={10 * steps}", "engine.keep_checkpoints=1",
                   "data.source=photos", "data.resize=false", "data.crop=random", f"data.num_workers={workers}",
                   "losses.random_init=true", "losses.gan_start=0", "monitor.image_every=0", "optim.batch_size=16"]
        subprocess.run(command, check=True, cwd=REPO)
        records = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > warmup and "images_per_s" in r]
    return {"images_per_s": sum(r["images_per_s"] for r in timed) / len(timed),
            "peak_memory_gib": max(r.get("peak_memory_gib", float("nan")) for r in timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"], help="'no' = fp32")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--workers", type=int, default=8, help="loader workers per GPU")
    parser.add_argument("--table", type=Path, default=None)
    args = parser.parse_args()
    lines = ["| GPUs | precision | images/s (all GPUs) | images/s per GPU | peak memory per GPU (GiB) |",
             "|---|---|---|---|---|"]
    for gpus in args.gpus:
        for precision in args.precisions:
            cell = run_cell(gpus, precision, args.steps, args.warmup, args.workers)
            lines.append(f"| {gpus} | {'fp32' if precision == 'no' else precision} | {cell['images_per_s']:.1f} | "
                         f"{cell['images_per_s'] / gpus:.1f} | {cell['peak_memory_gib']:.1f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.table:
        args.table.write_text("# Tokenizer training throughput (M128, batch 16 per GPU, full losses)\n\n" + table)


if __name__ == "__main__":
    main()

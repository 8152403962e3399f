"""Tokenizer training throughput: images/s and peak GPU memory at M128, batch 16 per GPU, all four losses
(loss networks with random weights: `losses.random_init=true`), for cells of precision x speed switches.

Each cell is a real `tokenizer/train.py` run under `accelerate launch` on random 256 crops of the bundled
photos (partition in loader workers), GAN on from step 0; the figure is the mean `images_per_s` logged over
the steps after `--warmup` (so compilation and cuDNN autotuning are excluded and data loading counts).
`images_per_s` counts the images the tokenizer is trained on: with the released alternating schedule
(`alternate` switch) the discriminator's own batches do not count. A cell is `PRECISION:SWITCH+SWITCH`:

    fp32 | bf16          precision (fp32 = engine.tf32 as configured: TF32 tensor cores unless `strict_fp32`)
    eager                no switch (what the config says)
    compile              engine.compile=true (inductor, dynamic=False)
    channels_last        engine.channels_last=true
    alternate            losses.gan_schedule=alternate (the release's schedule; default same_batch)
    strict_fp32          engine.tf32=false
    checkpoint           engine.activation_checkpointing=true (the decoder's levels recomputed in the backward)

`--profile` adds `--profile-steps` steps after the timed ones under torch.profiler (not timed) and copies
each cell's table of the top CUDA kernels and operators to `--out/profile_<cell>.txt`. Before the cells, a
data probe times the loader alone (same dataset, batch and workers) so a loader bottleneck shows as such.
One GPU, the acceptance cells with their profiles (about 6 minutes: ~45 s per eager cell, ~2-3 min per compiled
cell, most of it compilation; a cell that fails or passes `--cell-timeout` is reported and the next one runs):

    python benchmarks/tokenizer_train.py --gpus 1 --profile --out /tmp/out/tokenizer_train \
        --cells bf16:eager bf16:compile+channels_last fp32:compile+channels_last

and, if time is left, which switch does what: `--cells bf16:channels_last bf16:compile fp32:eager`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "train_gpstoken_m128.yaml"
SWITCHES = {
    "eager": [],
    "compile": ["engine.compile=true"],
    "channels_last": ["engine.channels_last=true"],
    "alternate": ["losses.gan_schedule=alternate"],
    "strict_fp32": ["engine.tf32=false"],
    "checkpoint": ["engine.activation_checkpointing=true"],
}
PRECISIONS = {"fp32": "no", "bf16": "bf16"}
DATA = ["data.source=photos", "data.resize=false", "data.crop=random"]


def parse_cell(cell: str) -> tuple[str, list[str]]:
    """'bf16:compile+channels_last' -> (accelerate precision, overrides)."""
    precision, _, switches = cell.partition(":")
    if precision not in PRECISIONS:
        raise SystemExit(f"cell {cell!r}: precision must be one of {list(PRECISIONS)}")
    overrides = [f"engine.mixed_precision={PRECISIONS[precision]}"]
    for switch in (switches or "eager").split("+"):
        if switch not in SWITCHES:
            raise SystemExit(f"cell {cell!r}: unknown switch {switch!r} (known: {list(SWITCHES)})")
        overrides += SWITCHES[switch]
    return PRECISIONS[precision], overrides


def run_cell(cell: str, args: argparse.Namespace) -> dict[str, float | str]:
    precision, overrides = parse_cell(cell)
    profile = ([f"engine.profile_at={args.steps}", f"engine.profile_steps={args.profile_steps}"]
               if args.profile else [])
    # one more step after the profiled ones: the last step writes the final checkpoint (a device-to-host copy of
    # every weight and optimizer state), which must not fall inside the profile window
    max_steps = args.steps + (args.profile_steps + 1 if args.profile else 0)
    with tempfile.TemporaryDirectory() as output:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                   "--num_processes", str(args.gpus), "--mixed_precision", precision, "--dynamo_backend", "no",
                   *(["--multi_gpu"] if args.gpus > 1 else []),
                   str(REPO / "tokenizer" / "train.py"), "--config", str(CONFIG), *overrides, *profile, *DATA,
                   f"engine.output_dir={output}", f"engine.max_steps={max_steps}", "engine.log_every=10",
                   f"engine.checkpoint_every={10 * max_steps}", "engine.keep_checkpoints=1",
                   f"data.num_workers={args.workers}", "losses.random_init=true", "losses.gan_start=0",
                   "monitor.image_every=0", "optim.batch_size=16"]
        start = time.perf_counter()
        try:
            subprocess.run(command, check=True, cwd=REPO, timeout=args.cell_timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            print(f"cell {cell}: {error}", flush=True)
            return {"cell": cell, "error": type(error).__name__}
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
        if args.profile and (Path(output) / "profile.txt").is_file():
            args.out.mkdir(parents=True, exist_ok=True)
            name = cell.replace(":", "_").replace("+", "_")   # plain file names only
            shutil.copy(Path(output) / "profile.txt", args.out / f"profile_{name}.txt")
    timed = [r for r in records if args.warmup < r["step"] <= args.steps and "images_per_s" in r]
    profiled = next((r for r in records if "profile_gpu_busy_ms_per_step" in r), {})
    rate = sum(r["images_per_s"] for r in timed) / len(timed)
    return {"cell": cell, "images_per_s": rate, "update_ms": 1000 * 16 * args.gpus / rate,
            "data_wait_ms": sum(r["data_wait_ms"] for r in timed) / len(timed),
            "peak_memory_gib": max(r.get("peak_memory_gib", float("nan")) for r in timed), "wall_s": wall,
            "gpu_busy_ms": profiled.get("profile_gpu_busy_ms_per_step", float("nan")),
            "gpu_busy_share": profiled.get("profile_gpu_busy_share", float("nan")),
            "syncs": profiled.get("profile_host_syncs_per_step", float("nan"))}


def data_probe(workers: int, batches: int, warmup: int) -> float:
    """Images/s of the benchmark's loader alone (the trainer's dataset, sampler and batch; no GPU)."""
    import torch

    sys.path.insert(0, str(REPO))
    from tokenizer.config import load_config
    from tokenizer.data import DataConfig, PartitionSettings, build_dataset
    from tokenizer.engine import ShardedInfiniteSampler

    model = load_config("gpstoken_m128")
    dataset = build_dataset(DataConfig(source="photos", resize=False, crop="random", num_workers=workers),
                            PartitionSettings(model.num_tokens, model.partition_min_size, model.partition_weight))
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=16, sampler=ShardedInfiniteSampler(len(dataset), 0),
                                              num_workers=workers, prefetch_factor=4 if workers else None))
    for _ in range(warmup):
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return 16 * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--cells", nargs="+", default=None,
                        help="PRECISION:SWITCH+SWITCH, e.g. bf16:compile+channels_last (see the module doc)")
    parser.add_argument("--precisions", nargs="+", choices=["no", "fp32", "bf16"], default=["no", "bf16"],
                        help="without --cells: one eager cell per precision ('no' = fp32)")
    parser.add_argument("--steps", type=int, default=30, help="timed window ends here")
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded from timing (compilation, autotuning)")
    parser.add_argument("--workers", type=int, default=8, help="loader workers per GPU")
    parser.add_argument("--profile", action="store_true", help="profile each cell after its timed steps")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--cell-timeout", type=int, default=300, help="seconds before a cell is abandoned")
    parser.add_argument("--no-data-probe", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "tokenizer_train_benchmark",
                        help="folder for the profile tables and results.json")
    parser.add_argument("--table", type=Path, default=None, help="also write the Markdown table here")
    args = parser.parse_args()
    if args.cells is None:
        args.cells = [f"{'fp32' if precision == 'no' else precision}:eager" for precision in args.precisions]
    if args.warmup % 10 or args.steps % 10 or args.steps <= args.warmup:
        raise SystemExit("--warmup and --steps must be multiples of the log interval (10), steps > warmup")
    for cell in args.cells:
        parse_cell(cell)   # refuse a typo before any GPU time is spent
    lines = []
    if not args.no_data_probe:
        rate = data_probe(args.workers, batches=20, warmup=4)
        lines.append(f"Loader alone ({args.workers} workers, photos, partition in workers): {rate:.0f} images/s\n")
        print(lines[-1], flush=True)
    lines += ["| GPUs | cell | images/s (all GPUs) | ms per tokenizer update | data wait ms/step | "
              "peak memory per GPU (GiB) | GPU busy ms/step (profiled) | GPU busy share (profiled) | "
              "host syncs/step | cell wall s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    results = []
    for cell in args.cells:
        result = run_cell(cell, args)
        results.append(result)
        if "error" in result:
            lines.append(f"| {args.gpus} | {cell} | {result['error']} | | | | | | | |")
        else:
            lines.append(f"| {args.gpus} | {cell} | {result['images_per_s']:.1f} | {result['update_ms']:.0f} | "
                         f"{result['data_wait_ms']:.1f} | {result['peak_memory_gib']:.1f} | "
                         f"{result['gpu_busy_ms']:.0f} | {result['gpu_busy_share']:.0%} | {result['syncs']:.1f} | "
                         f"{result['wall_s']:.0f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(table)
    if args.table:
        args.table.write_text("# Tokenizer training throughput (M128, batch 16 per GPU, full losses)\n\n" + table)


if __name__ == "__main__":
    main()

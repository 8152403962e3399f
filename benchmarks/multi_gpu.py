"""Multi-GPU checks of the generator and the tokenizer on one host with >= 2 GPUs: one command, each step
time-limited and logged.

    python3 benchmarks/multi_gpu.py --output $OUT/multi_gpu [--gpus 2] [--budget 420] --skip tokenizer [--dit-compile]
    python3 benchmarks/multi_gpu.py --output $OUT/multi_gpu_tokenizer [--gpus 2] --budget 570 \
        --skip curves sampling throughput tokenizer_curves     # the tokenizer's throughput: a call of its own
    python3 benchmarks/multi_gpu.py --output /tmp/mg --allow-cpu --steps 200 --batch 32 --samples 1024 \
        --skip throughput tokenizer --tokenizer-steps 60 --tokenizer-batch 8 \
        --tokenizer-override losses.feature_weight=0       # CPU smoke test of steps 1, 2, 4 (Inception: slow there)

Steps, in this order (a step that fails or runs out of time is recorded and the next one starts; the steps share
`--budget` seconds, a step left with < 20 s is skipped). Estimated on 2 H200s: curves 1 min, sampling 1 min,
throughput 2 min eager (add ~80 s per run for `--dit-compile`), tokenizer curves 1.5 min, tokenizer throughput
about 8 min compiled (two runs; the second reuses the first one's compilation cache).

1. curves: the real `generator/train_dit.py` under `accelerate launch` on 1 GPU and on `--gpus` GPUs, same seed,
   same token shards, same GLOBAL batch (`data.batch_size` is per process, so it is `--batch / gpus` on the multi-GPU
   run; the engine's sampler deals each global batch of the 1-GPU run out to the processes, so both runs see the same
   samples at every step). Per-step loss from each run's metrics.jsonl (the engine logs the mean over processes, i.e.
   the loss of the global batch); the flow noise differs between the runs (each process has its own noise stream),
   so the curves are compared after a moving average: mean absolute difference, largest relative difference and the
   verdict (`--tolerance`), next to the difference expected from step-to-step noise alone. The shards are synthetic
   but structured (written here with the library's shard writer): valid tilings of a 32x32 tile whose token centres
   cluster where the class puts them, textures a fixed function of class and geometry, so the loss falls clearly.
2. sampling: `generator/sample.py` (tiny texture model trained in step 1, random-weight `gpstoken_tiny32` tokenizer,
   real layouts from the shards, SDE) with 1 process and with `--gpus` processes, same seed; samples.npz, layouts.npz
   and the PNGs of the two runs are compared (bitwise, else the largest pixel difference and how many differ).
3. throughput: `benchmarks/dit_train.py` (SiT-XL, 128 tokens, batch 256 per GPU, bf16, `--dit-steps` steps of which
   the first `--dit-warmup` are not timed) once with `--gpus 1` and once with `--gpus N`; scaling efficiency =
   (images/s on N) / (N x images/s on 1). Eager unless `--dit-compile` (compiling costs about 80 s per run, see
   benchmarks/RESULTS.md).
4. tokenizer_curves: the real `tokenizer/train.py` (configs/train_tiny_photos.yaml: the tiny tokenizer on crops of
   the bundled photos, all four losses with random loss networks, the GAN from step 20) on 1 and on `--gpus`
   processes at the same global batch (`--tokenizer-batch`), compared as in step 1 on the pixel loss.
5. tokenizer: `benchmarks/tokenizer_train.py` (M128, batch 16 per GPU, all losses, cell `--tokenizer-cell`) on 1 GPU
   and on `--gpus` GPUs: images/s and scaling efficiency; it needs the scikit-image photos on the machine.

Everything is generated here: no dataset or weights are needed. Needs diffusers (the engine's EMA) and, for the
tokenizer steps, lpips importable. Written to DIR (a folder of its own: it holds a `logs/` folder while running):
summary.md (the table), results.json (every number), curves.png and tokenizer_curves.png, logs.tgz (one log per
command plus the step outputs). Scratch (shards, runs, samples) lives in `--work` (default a temporary folder,
deleted at the end). `--allow-cpu` runs the same commands as CPU processes (gloo) for a smoke test on a machine
without GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from generator.calibration import calibrate_layouts  # noqa: E402
from generator.report import line_plot  # noqa: E402
from generator.shards import ShardPlan, finalize_shards, write_plan, write_shard  # noqa: E402
from tokenizer.engine import read_metrics  # noqa: E402

STEPS = ("curves", "sampling", "throughput", "tokenizer_curves", "tokenizer")
STEP_LIMITS = {"curves": 150, "sampling": 100, "throughput": 300, "tokenizer_curves": 150,
               "tokenizer": 560}  # seconds, before the budget
TEXTURE_CONFIG = REPO / "configs" / "dit_tiny.yaml"  # 16 tokens of 5 + 8 channels, 3 classes: gpstoken_tiny32's
TOKENIZER_TRAIN_CONFIG = REPO / "configs" / "train_tiny_photos.yaml"  # all four losses, GAN from step 20, no dataset
TOKENIZER = "gpstoken_tiny32"
NUM_CLASSES, NUM_TOKENS, TEXTURE_CHANNELS, TILE, MIN_SIZE = 3, 16, 8, 32, 4


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------

def structured_shards(directory: Path, samples: int, seed: int = 0, shard_size: int = 1024) -> None:
    """Token shards of `samples` synthetic images: each layout is a valid tiling (the calibration of centres drawn
    around class-specific points), each token's texture a fixed function of its class and geometry plus a little
    noise; the stored hflip variant mirrors the geometry and recomputes the textures from it."""
    rng = np.random.default_rng(seed)
    anchors = rng.uniform(-0.6, 0.6, (NUM_CLASSES, 2))
    mixing = rng.standard_normal((NUM_CLASSES, 7, TEXTURE_CHANNELS))

    def tokens_of(layout: np.ndarray, labels: np.ndarray) -> np.ndarray:
        sigma, mu = layout[..., 0:2], layout[..., 3:5]
        features = np.concatenate([np.ones_like(sigma[..., :1]), mu, np.sin(3 * mu), 8 * sigma], axis=-1)
        texture = np.einsum("bnf,bfc->bnc", features, mixing[labels])
        geometry = layout + 0.01 * rng.standard_normal(layout.shape)
        return np.concatenate([geometry, texture + 0.1 * rng.standard_normal(texture.shape)], axis=-1)

    plan = ShardPlan(num_samples=samples, shard_size=shard_size, num_tokens=NUM_TOKENS,
                     token_dim=5 + TEXTURE_CHANNELS, variants=("original", "hflip"), num_classes=NUM_CLASSES,
                     tile_size=TILE, min_size=MIN_SIZE, tokenizer="synthetic (benchmarks/multi_gpu.py)")
    write_plan(directory, plan)
    for shard in range(plan.num_shards):
        count = len(plan.shard_range(shard))
        labels = rng.integers(0, NUM_CLASSES, count)
        centres = np.clip(anchors[labels, None] + 0.35 * rng.standard_normal((count, NUM_TOKENS, 2)), -1, 1)
        layout = calibrate_layouts(np.concatenate([np.zeros((count, NUM_TOKENS, 3)), centres], axis=-1),
                                   tile_size=TILE, min_size=MIN_SIZE).geometry
        mirrored = layout * np.array([1, 1, -1, -1, 1], dtype=np.float32)
        layouts = np.stack([layout, mirrored], axis=1)
        tokens = np.stack([tokens_of(layout, labels), tokens_of(mirrored, labels)], axis=1)
        write_shard(directory, plan, shard, tokens, layouts, labels)
    finalize_shards(directory)


def random_tokenizer(directory: Path, seed: int = 0) -> Path:
    """Random weights of the tiny tokenizer (sampling only has to be reproducible, not pretty)."""
    import torch
    from safetensors.torch import save_file

    from tokenizer.model import GPSToken

    torch.manual_seed(seed)
    model = GPSToken.from_config_name(TOKENIZER)
    path = directory / "tokenizer.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# --------------------------------------------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    name: str
    status: str = "ok"             # ok | failed | timeout | skipped
    seconds: float = 0.0
    summary: str = ""
    data: dict = field(default_factory=dict)


class StepFailed(RuntimeError):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


class Session:
    """Runs the commands of the steps: one log per command, a deadline per step, an overall time budget."""

    def __init__(self, output: Path, work: Path, budget: float):
        self.output, self.work = output, work
        self.logs = output / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.end = time.monotonic() + budget
        self.deadline = self.end
        self.texture_run: Path | None = None  # the 1-GPU run of step 'curves' (what step 'sampling' samples from)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, command: list[str]) -> None:
        """Run one command (logged to logs/<name>.log) until the step's deadline; raise StepFailed unless exit 0."""
        limit = self.remaining()
        if limit < 5:
            raise StepFailed("timeout", f"{name}: no time left in the step")
        log_path = self.logs / f"{name}.log"
        print(f"  {name}: started (limit {limit:.0f} s, log {log_path.name})", flush=True)
        start = time.monotonic()
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                code = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                code = None
            finally:  # also on Ctrl-C
                if process.poll() is None:
                    stop(process)
        if code is None:
            raise StepFailed("timeout", f"{name}: killed after {limit:.0f} s (see logs/{log_path.name})")
        print(f"  {name}: exit {code} after {time.monotonic() - start:.0f} s", flush=True)
        if code != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            raise StepFailed("failed", f"{name}: exit {code}: {tail[0][:200]} (see logs/{log_path.name})")


def stop(process: subprocess.Popen, grace: float = 20) -> None:
    """End a command started in its own process group: SIGTERM first, because torchrun (inside accelerate launch)
    starts its workers in sessions of their own and ends them only when it is terminated, not killed; then SIGKILL."""
    os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        process.poll()
        try:
            os.killpg(process.pid, 0)  # anyone of the group left?
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def launch(processes: int, script: str, *args: str) -> list[str]:
    """`accelerate launch` of a repository script on `processes` local processes (GPUs, or gloo CPU processes)."""
    multi = ["--multi_gpu"] if processes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes",
            str(processes), *multi, "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / script), *args]


# --------------------------------------------------------------------------------------------------------------
# Step 1: loss curves
# --------------------------------------------------------------------------------------------------------------

def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    return np.convolve(values, np.ones(window) / window, mode="valid")


def compare_curves(one: list[dict], many: list[dict], window: int, tolerance: float, key: str = "loss") -> dict:
    """Smoothed per-step curves of the logged value `key` of two runs: their differences and the verdict."""
    steps = sorted({r["step"] for r in one if key in r} & {r["step"] for r in many if key in r})
    if len(steps) < 2 * window:
        raise StepFailed("failed", f"only {len(steps)} common logged steps (need >= {2 * window}; log_every=1?)")
    by_step = [{r["step"]: r[key] for r in run if key in r} for run in (one, many)]
    loss = [np.array([values[s] for s in steps]) for values in by_step]
    smooth = [moving_average(curve, window) for curve in loss]
    difference = np.abs(smooth[0] - smooth[1])
    relative = difference / np.abs(smooth[0])
    # Were the two runs the same process with independent noise, their smoothed curves would differ by about
    # sqrt((s1^2 + s2^2) / window) at each step (s: the per-step scatter around the smoothed curve); mean |N(0, v)|.
    scatter = [float(np.std(curve[window // 2:window // 2 + len(s)] - s)) for curve, s in zip(loss, smooth)]
    noise_only = float(np.sqrt((scatter[0] ** 2 + scatter[1] ** 2) / window) * np.sqrt(2 / np.pi))
    worst = int(np.argmax(relative))
    return {"steps": len(steps), "window": window, "mean_abs_diff": float(difference.mean()),
            "max_rel_diff": float(relative.max()), "max_rel_diff_at_step": steps[worst + window - 1],
            "mean_abs_diff_expected_from_noise": noise_only, "per_step_scatter": scatter,
            "first_loss": [float(c[0]) for c in loss],
            "final_loss_mean_last_window": [float(c[-window:].mean()) for c in loss],
            "tolerance": tolerance, "match": bool(relative.max() <= tolerance),
            "curves": {"step": steps, "loss_1": loss[0].tolist(), "loss_n": loss[1].tolist()}}


def plot_curves(path: Path, comparison: dict, gpus: int, title: str) -> None:
    from PIL import Image

    curves, window = comparison["curves"], comparison["window"]
    steps = curves["step"]
    raw = {"1 GPU": (steps, curves["loss_1"]), f"{gpus} GPUs": (steps, curves["loss_n"])}
    smooth = {name: (xs[window - 1:], moving_average(np.array(ys), window)) for name, (xs, ys) in raw.items()}
    panels = [line_plot(raw, f"{title} per step (same global batch)", width=720, height=280),
              line_plot(smooth, f"moving average over {window} steps", width=720, height=280)]
    Image.fromarray(np.concatenate(panels, axis=0)).save(path)


def step_curves(session: Session, args) -> StepResult:
    shards = session.work / "shards"
    structured_shards(shards, samples=args.samples)
    runs = {}
    for processes in (1, args.gpus):
        run = session.work / f"texture_{processes}"
        runs[processes] = run
        session.run(f"curves_{processes}gpu", launch(
            processes, "generator/train_dit.py", "--config", str(TEXTURE_CONFIG), f"data.shards={shards}",
            f"data.batch_size={args.batch // processes}", "data.num_workers=2", f"engine.output_dir={run}",
            f"engine.max_steps={args.steps}", "engine.log_every=1", f"engine.checkpoint_every={args.steps}",
            "engine.keep_checkpoints=1", "engine.seed=0", "preview.every=0"))
        if processes == 1:
            session.texture_run = run
    comparison = compare_curves(read_metrics(runs[1]), read_metrics(runs[args.gpus]), args.window, args.tolerance)
    plot_curves(session.output / "curves.png", comparison, args.gpus, "train_dit loss")
    summary = curves_summary(comparison, "loss", args.batch, args.gpus, args.steps, args.window)
    return StepResult("curves", "ok" if comparison["match"] else "failed", summary=summary, data=comparison)


def curves_summary(comparison: dict, key: str, batch: int, gpus: int, steps: int, window: int) -> str:
    verdict = "MATCH" if comparison["match"] else "DIFFER"
    first, final = comparison["first_loss"], comparison["final_loss_mean_last_window"]
    return (f"global batch {batch} ({batch // gpus} per process on {gpus}), {steps} steps: "
            f"{key} {first[0]:.3f} -> {final[0]:.3f} (1 GPU) / {final[1]:.3f} ({gpus} GPUs); smoothed "
            f"({window} steps) mean abs diff {comparison['mean_abs_diff']:.4f} (noise alone ~"
            f"{comparison['mean_abs_diff_expected_from_noise']:.4f}), max rel diff "
            f"{100 * comparison['max_rel_diff']:.2f}% at step {comparison['max_rel_diff_at_step']} "
            f"(tolerance {100 * comparison['tolerance']:.0f}%): **{verdict}**")


# --------------------------------------------------------------------------------------------------------------
# Step 2: sampling identity
# --------------------------------------------------------------------------------------------------------------

def compare_samples(one: Path, many: Path) -> dict:
    """Compare two sample folders of generator/sample.py: images, labels, layouts and PNG files."""
    with np.load(one / "samples.npz") as a, np.load(many / "samples.npz") as b:
        images = [a["arr_0"], b["arr_0"]]
        labels_equal = bool(np.array_equal(a["arr_1"], b["arr_1"]))
    with np.load(one / "layouts.npz") as a, np.load(many / "layouts.npz") as b:
        layout_diff = float(np.abs(a["geometry"] - b["geometry"]).max())
    if images[0].shape != images[1].shape:
        raise StepFailed("failed", f"sample shapes differ: {images[0].shape} vs {images[1].shape}")
    pixel_diff = np.abs(images[0].astype(np.int16) - images[1].astype(np.int16))
    pngs = sorted(p.name for p in (one / "images").glob("*.png"))
    same_png = sum((one / "images" / n).read_bytes() == (many / "images" / n).read_bytes() for n in pngs
                   if (many / "images" / n).is_file())
    return {"samples": int(images[0].shape[0]), "image_shape": list(images[0].shape[1:]),
            "bitwise_identical": bool(pixel_diff.max() == 0 and labels_equal and layout_diff == 0),
            "max_abs_pixel_diff": int(pixel_diff.max()), "differing_pixel_values": int((pixel_diff > 0).sum()),
            "labels_equal": labels_equal, "layouts_max_abs_diff": layout_diff,
            "png_files": len(pngs), "png_files_identical": int(same_png), "image_std": float(images[0].std())}


def step_sampling(session: Session, args) -> StepResult:
    run = session.texture_run
    if run is None or not (run / "ema.safetensors").is_file():
        raise StepFailed("skipped", "needs the 1-GPU texture run of step 'curves'")
    weights = random_tokenizer(session.work)
    outputs = {}
    for processes in (1, args.gpus):
        outputs[processes] = session.work / f"samples_{processes}"
        session.run(f"sampling_{processes}gpu", launch(
            processes, "generator/sample.py", "--generator", str(run), "--tokenizer", TOKENIZER,
            "--tokenizer-weights", str(weights), "--layout", "shards", "--shards", str(session.work / "shards"),
            "--per-class", str(args.per_class), "--batch-size", "4", "--chunk-size", "4", "--png",
            "--method", "sde", "--steps", "25", "--seed", "7", "--output", str(outputs[processes])))
    result = compare_samples(outputs[1], outputs[args.gpus])
    log = (session.logs / f"sampling_{args.gpus}gpu.log").read_text(errors="replace")
    result["last_rank_sampled"] = f"sample[{args.gpus - 1}]" in log
    if result["bitwise_identical"]:
        verdict = "bitwise identical"
    else:
        verdict = (f"NOT identical: max abs pixel diff {result['max_abs_pixel_diff']} over "
                   f"{result['differing_pixel_values']} values, layouts max diff {result['layouts_max_abs_diff']:.2e}")
    summary = (f"{result['samples']} samples {'x'.join(map(str, result['image_shape']))}, 1 vs {args.gpus} processes "
               f"(rank {args.gpus - 1} sampled: {'yes' if result['last_rank_sampled'] else 'NO'}): samples.npz "
               f"{verdict}; PNG files identical {result['png_files_identical']}/{result['png_files']}")
    ok = result["bitwise_identical"] and result["last_rank_sampled"]
    return StepResult("sampling", "ok" if ok else "failed", summary=summary, data=result)


# --------------------------------------------------------------------------------------------------------------
# Steps 3 and 4: throughput (the other benchmark scripts)
# --------------------------------------------------------------------------------------------------------------

def step_throughput(session: Session, args) -> StepResult:
    rows = {}
    for gpus in (1, args.gpus):
        out = session.logs / f"dit_train_{gpus}gpu.json"
        session.run(f"throughput_{gpus}gpu", [
            sys.executable, str(REPO / "benchmarks" / "dit_train.py"), "--gpus", str(gpus), "--steps",
            str(args.dit_steps), "--warmup", str(args.dit_warmup), "--out", str(out),
            *(["--compile"] if args.dit_compile else [])])
        rows[gpus] = json.loads(out.read_text())[0]
    efficiency = rows[args.gpus]["images_per_s"] / (args.gpus * rows[1]["images_per_s"])
    mode = "compiled" if args.dit_compile else "eager"
    summary = (f"SiT-XL, batch {rows[1]['batch_per_gpu']} per GPU, bf16, {mode}: 1 GPU "
               f"{rows[1]['images_per_s']:.0f} img/s (MFU {100 * rows[1]['mfu']:.1f}%), {args.gpus} GPUs "
               f"{rows[args.gpus]['images_per_s']:.0f} img/s; scaling efficiency **{100 * efficiency:.1f}%**")
    return StepResult("throughput", summary=summary, data={"runs": rows, "scaling_efficiency": efficiency})


def step_tokenizer_curves(session: Session, args) -> StepResult:
    """tokenizer/train.py on 1 and on `--gpus` processes, same seed and global batch: the tiny tokenizer on photo
    crops with all four losses (random loss networks) and the GAN from step 20. Compared: the pixel loss, the
    tokenizer's reconstruction term (the total also holds the GAN term, whose discriminator normalises with
    per-process batch statistics)."""
    runs = {}
    batch = args.tokenizer_batch
    for processes in (1, args.gpus):
        runs[processes] = session.work / f"tokenizer_{processes}"
        session.run(f"tokenizer_curves_{processes}gpu", launch(
            processes, "tokenizer/train.py", "--config", str(TOKENIZER_TRAIN_CONFIG),
            f"optim.batch_size={batch // processes}", "data.num_workers=2", f"engine.output_dir={runs[processes]}",
            f"engine.max_steps={args.tokenizer_steps}", "engine.log_every=1",
            f"engine.checkpoint_every={args.tokenizer_steps}", "monitor.image_every=0", *args.tokenizer_override))
    comparison = compare_curves(read_metrics(runs[1]), read_metrics(runs[args.gpus]), args.window, args.tolerance,
                                key="pixel")
    plot_curves(session.output / "tokenizer_curves.png", comparison, args.gpus, "tokenizer pixel loss")
    summary = curves_summary(comparison, "pixel loss", batch, args.gpus, args.tokenizer_steps, args.window)
    return StepResult("tokenizer_curves", "ok" if comparison["match"] else "failed", summary=summary,
                      data=comparison)


def step_tokenizer(session: Session, args) -> StepResult:
    """benchmarks/tokenizer_train.py (M128, batch 16 per GPU, all losses) with one cell, on 1 GPU and on `--gpus`:
    images/s and scaling efficiency. The compiled cell takes about 4 minutes per run on an H200 (the second run
    reuses the first one's compilation cache): run this step in a call of its own (see the module doc)."""
    rows = {}
    for gpus in (1, args.gpus):
        out = session.work / f"tokenizer_train_{gpus}gpu"
        session.run(f"tokenizer_{gpus}gpu", [
            sys.executable, str(REPO / "benchmarks" / "tokenizer_train.py"), "--gpus", str(gpus),
            "--cells", args.tokenizer_cell, "--steps", "30", "--warmup", "10", "--no-data-probe",
            "--cell-timeout", str(max(int(session.remaining()) - 10, 10)), "--out", str(out)])
        result = json.loads((out / "results.json").read_text())[0]
        if "error" in result:
            raise StepFailed("failed", f"tokenizer_train.py on {gpus} GPU(s): {result['error']}")
        rows[gpus] = result
    efficiency = rows[args.gpus]["images_per_s"] / (args.gpus * rows[1]["images_per_s"])
    summary = (f"GPSToken-M128, batch 16 per GPU, all losses, {args.tokenizer_cell}: 1 GPU "
               f"{rows[1]['images_per_s']:.1f} img/s ({rows[1]['peak_memory_gib']:.1f} GiB), {args.gpus} GPUs "
               f"{rows[args.gpus]['images_per_s']:.1f} img/s; scaling efficiency **{100 * efficiency:.1f}%**")
    return StepResult("tokenizer", summary=summary, data={"runs": rows, "scaling_efficiency": efficiency})


STEP_FUNCTIONS = {"curves": step_curves, "sampling": step_sampling, "throughput": step_throughput,
                  "tokenizer_curves": step_tokenizer_curves, "tokenizer": step_tokenizer}


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------

def machine_description() -> str:
    import torch

    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
        gpus = ", ".join(n.strip() for n in names if n.strip()) or "no GPU"
    except (OSError, subprocess.TimeoutExpired):
        gpus = "no nvidia-smi"
    return f"{gpus}; {os.cpu_count()} CPUs; torch {torch.__version__}; python {sys.version.split()[0]}"


def write_report(output: Path, results: list[StepResult], args, machine: str) -> None:
    lines = [f"# Multi-GPU checks ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Command: `python3 benchmarks/multi_gpu.py {' '.join(sys.argv[1:])}`  ", f"Machine: {machine}", "",
             "| step | status | time (s) | result |", "|---|---|---|---|"]
    for result in results:
        lines.append(f"| {result.name} | {result.status} | {result.seconds:.0f} | {result.summary} |")
    lines += ["", "Logs: logs.tgz (one log per command, the step outputs). Curves: curves.png (texture model), "
              "tokenizer_curves.png. Numbers: results.json."]
    (output / "summary.md").write_text("\n".join(lines) + "\n")
    (output / "results.json").write_text(json.dumps(
        {"machine": machine, "arguments": vars(args), "steps": [asdict(r) for r in results]}, indent=1, default=str))
    with tarfile.open(output / "logs.tgz", "w:gz") as archive:
        archive.add(output / "logs", arcname="logs")
    shutil.rmtree(output / "logs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder for summary.md, results.json, "
                        "curves.png, logs.tgz")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary folder, deleted at the end)")
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the multi-GPU runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=STEPS)
    parser.add_argument("--budget", type=float, default=420, help="seconds for all steps together")
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU processes when there are fewer GPUs")
    curves = parser.add_argument_group("curves and sampling")
    curves.add_argument("--steps", type=int, default=400)
    curves.add_argument("--batch", type=int, default=128, help="global batch (split over the processes)")
    curves.add_argument("--samples", type=int, default=4096, help="synthetic training images")
    curves.add_argument("--window", type=int, default=25, help="moving-average window of the loss curves")
    curves.add_argument("--tolerance", type=float, default=0.05, help="largest relative difference allowed")
    curves.add_argument("--per-class", type=int, default=8, help="samples per class in the sampling step")
    throughput = parser.add_argument_group("throughput")
    throughput.add_argument("--dit-steps", type=int, default=50)
    throughput.add_argument("--dit-warmup", type=int, default=20)
    throughput.add_argument("--dit-compile", action="store_true")
    tokenizer = parser.add_argument_group("tokenizer")
    tokenizer.add_argument("--tokenizer-steps", type=int, default=300, help="steps of the tokenizer curves")
    tokenizer.add_argument("--tokenizer-batch", type=int, default=32, help="global batch of the tokenizer curves")
    tokenizer.add_argument("--tokenizer-override", nargs="*", default=[], metavar="KEY=VALUE",
                           help="more overrides of the tokenizer curves' run config")
    tokenizer.add_argument("--tokenizer-cell", default="bf16:compile+channels_last",
                           help="benchmarks/tokenizer_train.py cell of the tokenizer throughput step")
    args = parser.parse_args(argv)
    if args.gpus < 2 or args.batch % args.gpus or args.samples % args.batch or args.tokenizer_batch % args.gpus:
        parser.error("need --gpus >= 2, --batch and --tokenizer-batch divisible by --gpus and --samples by --batch "
                     "(same global batches)")
    import torch

    if torch.cuda.device_count() < args.gpus and not args.allow_cpu:
        parser.error(f"{torch.cuda.device_count()} GPU(s) visible, --gpus {args.gpus} needed (or --allow-cpu)")
    args.output.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="multi_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    print(f"multi_gpu: {machine}; work in {work}", flush=True)
    session = Session(args.output, work, args.budget)
    results = []
    try:
        for name in STEPS:
            result = StepResult(name)
            start = time.monotonic()
            session.deadline = min(session.end, start + STEP_LIMITS[name])
            if name in args.skip:
                result.status, result.summary = "skipped", "--skip"
            elif session.remaining() < 20:
                result.status, result.summary = "skipped", "time budget spent"
            else:
                print(f"[{name}] up to {session.remaining():.0f} s", flush=True)
                try:
                    result = STEP_FUNCTIONS[name](session, args)
                except StepFailed as error:
                    result.status, result.summary = error.status, str(error)
                except Exception as error:  # a broken step must not cost the others their run
                    result.status, result.summary = "failed", f"{type(error).__name__}: {error}"
            result.seconds = time.monotonic() - start
            results.append(result)
            print(f"[{name}] {result.status} ({result.seconds:.0f} s): {result.summary}", flush=True)
    finally:
        write_report(args.output, results, args, machine)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print((args.output / "summary.md").read_text())
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

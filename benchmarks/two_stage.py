"""Issue 7: what the layout stage costs per image, and the Fashion-MNIST two-stage experiment in one command.

    python benchmarks/two_stage.py timing [--batch 8] [--texture-steps 250] [--device cuda] [--out FILE]
    python benchmarks/two_stage.py fashion --output runs/two_stage_fashion \
        [--config configs/pipeline_two_stage_fashion.yaml] [--data DIR] [--device cuda]

`timing`: per image, stage 1 = the layout model (SiT-S of configs/layout_s.yaml, 5-step Euler ODE, no guidance) +
calibration (256 px tile, min_size 8, 128 tokens) against stage 2 = the texture model (SiT-XL, the released
sampler: Euler-Maruyama SDE, 250 steps, guidance 1.5 for t >= 0.2) + the GPSToken-M128 decoder, all with random
weights (the cost does not depend on them), and prints stage 1's share of the total. The goal (issue 7): < 10%.
With `--texture-steps S` < 250 (a CPU cannot run 250 XL steps in minutes) the texture time is measured over S
steps and scaled to the released 250 by network rows, the unit every step costs (`generator.samplers`: one row
per conditional sample, two inside the guidance interval); the output says so. The analytic ratio of network
FLOPs (benchmarks/dit_train.py's `forward_flops`) is printed alongside: calibration and decoding are not in it.

`fashion`: issue 7's table on Fashion-MNIST at the tokenizer's resolution. `generator.pipeline` trains the
tokenizer, extracts the training set and trains the layout and texture models (its own sample/evaluate/report
stages run too: the report is a free look at the run); then the one-stage baseline is trained from the texture
model's run config with only what makes it one-stage changed (stage, no layout input, a positional embedding,
no layout noise), so size, steps and recipe match by construction. Every arm samples through generator/sample.py
with the pipeline config's sampler settings and is scored by eval/fid.py against the same test images:
(a) layout model + calibration + texture model, (b) the texture model on real layouts of training images,
(c) the one-stage model, (d) the tokenizer's reconstructions of those test images; (a) and (b) with
`--layouts` against the test images' entropy partitions. Rerunning the command resumes every part. Output:
`<output>/table.md` (also printed).
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

RELEASED_STEPS = 250
TABLE_ROWS = (("a", "two_stage", "two-stage: layout model + calibration + texture model"),
              ("b", "real_layouts", "texture model on real layouts (training-set partitions)"),
              ("c", "one_stage", "one-stage baseline (same size and steps, no layout)"),
              ("d", "reconstructions", "tokenizer reconstructions of the test images"))


def network_rows_per_image(sampler) -> int:
    """Network rows the SDE sampler evaluates per image (`generator.samplers.Guidance.active`)."""
    from generator.samplers import Guidance, time_grid

    guidance = Guidance(sampler.guidance_scale, sampler.guidance_low, sampler.guidance_high)
    times = time_grid(sampler.sde_t0, 1 - sampler.last_step_size, sampler.num_steps)
    return sum(2 if guidance.active(t) else 1 for t in times)


def timing(args) -> dict:
    from dit_train import forward_flops
    from sample import layout_bank

    from generator.calibration import calibrate_layouts
    from generator.config import SamplerConfig
    from generator.flow import M128_TOKEN_STATS
    from generator.models import build_model
    from generator.official import released_config
    from generator.sampling import ModelLayouts, TokenGenerator
    from generator.spaces import LayoutSpace, TextureSpace
    from generator.training import GeneratorRunConfig
    from tokenizer.engine import load_run_config
    from tokenizer.model import GPSToken

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    layout_config = load_run_config(GeneratorRunConfig, REPO / "configs" / "layout_s.yaml")[0].model
    layout_model = build_model(layout_config).to(device).eval()
    # a plausible layout space: centres spread over the tile, so calibration sees realistic, non-tiling input
    space = LayoutSpace((0.08, 0.08, 0.0, 0.0, 0.0), (0.05, 0.05, 1.0, 0.55, 0.55))
    layout_sampler = SamplerConfig(method="euler", num_steps=5, guidance_scale=1.0)
    layouts = ModelLayouts(layout_model, space, layout_sampler, seed=0)
    texture_config = released_config()
    texture_model = build_model(texture_config).to(device).eval()
    texture_sampler = SamplerConfig(method="sde", num_steps=args.texture_steps, guidance_scale=1.5, guidance_low=0.2)
    texture = TokenGenerator(texture_model, TextureSpace(M128_TOKEN_STATS), texture_sampler, layout_bank(), seed=0)
    tokenizer = GPSToken.from_config_name("gpstoken_m128").to(device).eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    seconds = {"layout_model": 0.0, "calibration": 0.0, "texture_model": 0.0, "decode": 0.0}

    def timed(key: str, work):
        sync()
        start = time.perf_counter()
        result = work()
        sync()
        seconds[key] += time.perf_counter() - start
        return result

    for repeat in range(args.batches + 1):  # batch 0 warms up and is not counted
        ids = list(range(repeat * args.batch, (repeat + 1) * args.batch))
        labels = [i % 1000 for i in ids]
        if repeat == 1:
            seconds = dict.fromkeys(seconds, 0.0)
            texture.rows = 0
        with torch.no_grad(), autocast:
            raw = timed("layout_model", lambda: layouts.sample(labels, ids)[0])
            timed("calibration", lambda: calibrate_layouts(raw, tile_size=256, min_size=8))
            tokens = timed("texture_model", lambda: texture.tokens(labels, ids))
            timed("decode", lambda: tokenizer.decode(tokens.float()))
    images = args.batch * args.batches
    # ModelLayouts.sample calibrates too; the separate calibration run measures that part
    seconds["layout_model"] -= seconds["calibration"]
    per_image = {key: value / images for key, value in seconds.items()}
    full_rows = network_rows_per_image(SamplerConfig(method="sde", num_steps=RELEASED_STEPS, guidance_scale=1.5,
                                                     guidance_low=0.2))
    scale = full_rows / (texture.rows / images)
    per_image["texture_model"] *= scale
    stage1 = per_image["layout_model"] + per_image["calibration"]
    stage2 = per_image["texture_model"] + per_image["decode"]
    flops1 = layout_sampler.num_steps * forward_flops(layout_config, layout_config.num_tokens)
    flops2 = full_rows * forward_flops(texture_config, texture_config.num_tokens)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "batch": args.batch, "batches": args.batches,
              "texture_steps_measured": args.texture_steps, "texture_scaled_to_rows": full_rows,
              "texture_scale_factor": scale, "seconds_per_image": per_image,
              "stage1_share": stage1 / (stage1 + stage2), "flop_share": flops1 / (flops1 + flops2),
              "layout_gflops_per_image": flops1 / 1e9, "texture_gflops_per_image": flops2 / 1e9}
    print(json.dumps(result, indent=1))
    print(f"stage 1 (layout model + calibration): {stage1 * 1e3:.1f} ms/image, stage 2 (texture + decode): "
          f"{stage2 * 1e3:.1f} ms/image{' (texture scaled from %d steps)' % args.texture_steps if scale != 1 else ''}"
          f"; share of stage 1: {100 * result['stage1_share']:.2f}% (FLOPs: {100 * result['flop_share']:.3f}%)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def write_heldout(tokenizer, images, out: Path, batch: int) -> None:
    """The test images (`reference.npz`), their entropy partitions (`real_layouts.npz`) and the tokenizer's
    reconstructions of them (`reconstructions.npz`, row (d))."""
    from tokenizer.images import to_uint8

    pixels = np.stack([images[i][0] for i in range(len(images))])
    labels = images.labels[:len(pixels)]
    geometry, reconstructions = [], []
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            tokenization = tokenizer.tokenize(pixels[start:start + batch])
            geometry.append(tokenization.init_geometry.cpu().numpy())
            reconstructions.append(to_uint8(tokenizer.decode(tokenization.tokens)))
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "real_layouts.npz", geometry=np.concatenate(geometry), labels=labels)
    np.savez(out / "reconstructions.npz", arr_0=np.concatenate(reconstructions), labels=labels)
    np.savez(out / "reference.npz", arr_0=pixels, labels=labels)  # last: its presence marks the three done


def sampler_flags(prefix: str, sampler) -> list[str]:
    """generator/sample.py's flags for a `SamplerConfig` (`prefix` "" for the texture sampler, "layout-")."""
    return [f"--{prefix}method", sampler.method, f"--{prefix}steps", str(sampler.num_steps),
            f"--{prefix}guidance", str(sampler.guidance_scale), f"--{prefix}guidance-low", str(sampler.guidance_low),
            f"--{prefix}guidance-high", str(sampler.guidance_high)]


def fashion(args) -> str:
    import dataclasses

    from eval.fid import main as fid_main
    from generator.extraction import open_labelled_images
    from generator.pipeline import PipelineError, RunPaths, load_pipeline_config, resolve_data_dir, run_pipeline
    from generator.sample import main as sample_main
    from generator.sampling import LAYOUTS_FILE
    from generator.training import EMA_FILE, train
    from tokenizer.engine import config_to_dict
    from tokenizer.official import load_released

    try:
        config = load_pipeline_config(args.config)
        data_dir = resolve_data_dir(args.data, config)
    except PipelineError as error:
        raise SystemExit(f"error: {error}") from error
    out = Path(args.output)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = RunPaths(out / "pipeline")
    run_pipeline(config, paths.root, data_dir, device)

    texture = config.texture
    one_stage = dataclasses.replace(
        texture, stage="one_stage", model=dataclasses.replace(texture.model, layout_channels=None, pos_embed=True),
        flow=dataclasses.replace(texture.flow, layout_noise_std=0.0),
        data=dataclasses.replace(texture.data, shards=str(paths.shards)),
        engine=dataclasses.replace(texture.engine, output_dir=str(out / "one_stage")),
        preview=dataclasses.replace(texture.preview, every=0))
    if not (out / "one_stage" / EMA_FILE).is_file():
        train(one_stage, config_to_dict(one_stage), resume="auto")

    heldout = out / "heldout"
    if not (heldout / "reference.npz").is_file():
        images, _ = open_labelled_images("fashion_mnist", str(data_dir), config.tokenizer_model.tile_size,
                                         split="test", limit=config.evaluate.fid_reference_images)
        tokenizer = load_released(paths.tokenizer_weights, config.tokenizer_model, device=device)
        write_heldout(tokenizer, images, heldout, config.evaluate.batch_size)

    settings = config.sample
    common = ["--tokenizer", str(paths.tokenizer_model), "--tokenizer-weights", str(paths.tokenizer_weights),
              "--per-class", str(settings.per_class), "--seed", str(settings.seed), "--batch-size",
              str(settings.batch_size), *sampler_flags("", settings.sampler)]
    arms = {"two_stage": ["--generator", str(paths.stage("texture")), "--layout", "model", "--layout-weights",
                          str(paths.stage("layout")), *sampler_flags("layout-", settings.layout_sampler)],
            "real_layouts": ["--generator", str(paths.stage("texture")), "--layout", "shards", "--shards",
                             str(paths.shards)],
            "one_stage": ["--generator", str(out / "one_stage")]}
    for name, flags in arms.items():
        if not (out / name / "samples.npz").is_file() or (name != "one_stage" and
                                                         not (out / name / LAYOUTS_FILE).is_file()):
            sample_main([*flags, *common, "--output", str(out / name)])
    fid_common = ["--device", device, "--batch-size", str(config.evaluate.batch_size), "--workers", "0", "--quiet",
                  "--cache-dir", str(out / "fid" / "cache")]
    inputs = {"two_stage": out / "two_stage" / "samples.npz", "real_layouts": out / "real_layouts" / "samples.npz",
              "one_stage": out / "one_stage" / "samples.npz", "reconstructions": heldout / "reconstructions.npz"}
    for name, samples in inputs.items():
        if (out / "fid" / f"{name}.json").is_file():
            continue
        layouts = ["--layouts", str(out / name / LAYOUTS_FILE), str(heldout / "real_layouts.npz")] \
            if name in ("two_stage", "real_layouts") else []
        if fid_main([str(samples), str(heldout / "reference.npz"), *fid_common, *layouts,
                     "--out", str(out / "fid" / name)]) != 0:
            raise SystemExit(f"error: eval/fid.py failed on {samples}")
    text = table(out, config)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return text


def table(out: Path, config) -> str:
    """The Markdown table of a `fashion` run from its eval/fid.py reports."""
    keys = ("fid", "precision", "recall", "layout_fd", "layout_fd_class_mean", "layout_exact_fraction")
    lines = [f"Fashion-MNIST at {config.tokenizer_model.tile_size} px, {config.tokenizer_model.num_tokens} tokens; "
             f"{config.sample.per_class * 10} samples vs {config.evaluate.fid_reference_images} test images.", "",
             "| row | samples | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for row, name, description in TABLE_ROWS:
        metrics = json.loads((out / "fid" / f"{name}.json").read_text())["metrics"]
        cells = [f"{metrics[k]:.4f}" if k in metrics else "-" for k in keys]
        lines.append(f"| ({row}) | {description} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("timing", help="stage 1's share of the per-image sampling time")
    run.add_argument("--batch", type=int, default=8)
    run.add_argument("--batches", type=int, default=1, help="timed batches (after one warm-up batch)")
    run.add_argument("--texture-steps", type=int, default=RELEASED_STEPS,
                     help="SDE steps actually run; the texture time is scaled to 250 steps by network rows")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--out", help="also write the JSON result here")
    experiment = commands.add_parser("fashion", help="issue 7's FID table on Fashion-MNIST (resumable)")
    experiment.add_argument("--output", required=True, help="run folder (rerun the same command to resume)")
    experiment.add_argument("--config", default=str(REPO / "configs" / "pipeline_two_stage_fashion.yaml"),
                            help="pipeline YAML (configs/pipeline_tiny.yaml: the CPU smoke size)")
    experiment.add_argument("--data", help="Fashion-MNIST idx folder (default as generator/pipeline.py)")
    experiment.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    {"timing": timing, "fashion": fashion}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The whole suite as one resumable job: tokenizer -> token extraction -> layout model -> texture model ->
class-conditional samples -> evaluation -> HTML/JSON report.

    python -m generator.pipeline --config configs/pipeline_fashion.yaml --output runs/fashion [--data DIR]

Why a pipeline module: the stages already exist as library functions (`tokenizer.train.train`,
`generator.extraction.extract_tokens`, `generator.training.train`, `generator.sampling.run_sampling`,
`eval.evaluate.evaluate_samples`); what a newcomer lacks is one command that wires them with consistent paths and
sizes, checks the wiring before minutes of training are spent, and can be interrupted and rerun. This module is
only that wiring; every computation is the named library's.

Config (`PipelineConfig`, one YAML): the tokenizer architecture (`tokenizer_model`, a `GPSTokenConfig`), the
run configs of the three trainers exactly as their own YAML files read (`tokenizer`, `layout`, `texture`), and the
pipeline's own `data`, `extract`, `sample` and `evaluate` sections. Paths inside the trainer sections (output
folders, data folders, shard folders) are set here from `--output` and the data folder, whatever the YAML says.

Data: Fashion-MNIST's four idx files, from `--data`, else `$FASHION_MNIST_DIR`, else `data.path`, else Debian's
`/usr/share/datasets/fashion-mnist` (package `dataset-fashion-mnist`).

Resuming: stage S writes `<output>/<S>/` and, last, the marker `<output>/<S>/stage.json` (its seconds and a
fingerprint of its config section and of the stages it reads). A rerun skips a stage whose marker exists with
the same fingerprint, refuses one whose fingerprint differs (its outputs would silently mix two configs), and
resumes an unfinished stage from its own checkpoints (trainers: `--resume auto`; extraction: finished shards;
sampling: finished chunks).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from tokenizer.config import GPSTokenConfig
from tokenizer.data import FASHION_MNIST_DIR
from tokenizer.engine import build_config, config_to_dict
from tokenizer.train import TokenizerTrainConfig

from .config import SamplerConfig
from .extraction import FASHION_MNIST_LABELS
from .training import GeneratorRunConfig


__all__ = ["DataSettings", "ExtractSettings", "SampleSettings", "EvaluateSettings", "PipelineConfig",
           "PipelineError", "load_pipeline_config", "resolve_data_dir", "RunPaths", "STAGES", "run_pipeline",
           "read_stage_marker"]

DATA_ENV_VAR = "FASHION_MNIST_DIR"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                       *FASHION_MNIST_LABELS.values())
MARKER_FILE = "stage.json"


class PipelineError(RuntimeError):
    """Bad input (config, data folder) or a finished stage that does not match the config."""


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------

@dataclass
class DataSettings:
    path: str = ""                     # folder of the four idx files ("" = $FASHION_MNIST_DIR or Debian's)


@dataclass
class ExtractSettings:
    train_images: int = 0              # the first N training images are encoded (0 = all 60,000)
    batch_size: int = 256
    num_workers: int = 1               # loader processes running the entropy partition
    hflip: bool = False                # Fashion-MNIST objects face one way: no mirrored copies by default


@dataclass
class SampleSettings:
    per_class: int = 100               # samples of every class (they are also the FID samples)
    grid_per_class: int = 10           # of which the report shows this many per class
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(method="euler", num_steps=25,
                                                                         guidance_scale=1.5, guidance_low=0.0))
    layout_sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(method="euler", num_steps=10,
                                                                                guidance_scale=1.0))
    batch_size: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.per_class < 1 or not 1 <= self.grid_per_class <= self.per_class or self.batch_size < 1:
            raise ValueError(f"sample: need per_class >= 1, 1 <= grid_per_class <= per_class and batch_size >= 1, "
                             f"got {self.per_class}, {self.grid_per_class}, {self.batch_size}")


@dataclass
class EvaluateSettings:
    reconstruction_images: int = 1000  # held-out (test split) images for PSNR/SSIM
    fid_reference_images: int = 1000   # test images the samples are compared with (FID, precision, recall)
    examples_per_class: int = 1        # reconstructions shown in the report, per class
    batch_size: int = 100

    def __post_init__(self) -> None:
        if min(self.reconstruction_images, self.fid_reference_images, self.examples_per_class, self.batch_size) < 1:
            raise ValueError("evaluate: every count must be >= 1")


@dataclass
class PipelineConfig:
    tokenizer_model: GPSTokenConfig = field(default_factory=GPSTokenConfig)
    tokenizer: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    layout: GeneratorRunConfig = field(default_factory=lambda: GeneratorRunConfig(
        stage="layout", model=dataclasses.replace(GeneratorRunConfig().model, layout_channels=None, in_channels=5)))
    texture: GeneratorRunConfig = field(default_factory=GeneratorRunConfig)
    data: DataSettings = field(default_factory=DataSettings)
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)


NUM_CLASSES = 10


def _check_consistency(config: PipelineConfig, where: str) -> None:
    """The sizes the stages must agree on, checked before any stage runs (a mismatch would otherwise surface
    only after the tokenizer trained for minutes)."""
    model, problems = config.tokenizer_model, []
    if config.tokenizer.data.source != "fashion_mnist":
        problems.append(f"tokenizer.data.source must be 'fashion_mnist', got {config.tokenizer.data.source!r}")
    if config.tokenizer.data.image_size != model.tile_size:
        problems.append(f"tokenizer.data.image_size {config.tokenizer.data.image_size} != the tokenizer's tile "
                        f"{model.tile_size} (render_size x 2^(levels-1))")
    for name, run, channels in (("layout", config.layout, 5), ("texture", config.texture, model.token_dim)):
        expected_stage = name
        if run.stage != expected_stage:
            problems.append(f"{name}.stage must be {expected_stage!r}, got {run.stage!r}")
        if run.model.num_tokens != model.num_tokens:
            problems.append(f"{name}.model.num_tokens {run.model.num_tokens} != tokenizer_model.num_tokens "
                            f"{model.num_tokens}")
        if run.model.in_channels != channels:
            problems.append(f"{name}.model.in_channels {run.model.in_channels} != {channels}")
        if run.model.num_classes != NUM_CLASSES:
            problems.append(f"{name}.model.num_classes must be {NUM_CLASSES} (Fashion-MNIST)")
    if problems:
        raise PipelineError(f"{where}: inconsistent pipeline config:\n  - " + "\n  - ".join(problems))


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read and check a pipeline YAML; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"pipeline config {path} not found (shipped: configs/pipeline_fashion.yaml, "
                            "configs/pipeline_tiny.yaml)")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: a pipeline config must be a YAML mapping")
    try:
        config = build_config(PipelineConfig, data, str(path))
    except ValueError as error:
        raise PipelineError(str(error)) from error
    _check_consistency(config, str(path))
    return config


def resolve_data_dir(explicit: str | None, config: PipelineConfig) -> Path:
    """The Fashion-MNIST folder: `--data`, `$FASHION_MNIST_DIR`, `data.path`, Debian's folder (first set)."""
    candidates = [(explicit, "--data"), (os.environ.get(DATA_ENV_VAR), f"${DATA_ENV_VAR}"),
                  (config.data.path, "data.path in the config"), (FASHION_MNIST_DIR, "the default")]
    folder, origin = next((Path(c), o) for c, o in candidates if c)
    missing = [name for name in FASHION_MNIST_FILES if not (folder / name).is_file()]
    if missing:
        raise PipelineError(
            f"Fashion-MNIST not found in {folder} ({origin}): missing {', '.join(missing)}.\n"
            f"Install Debian's package (apt-get install dataset-fashion-mnist, done by `bash scripts/setup.sh demo` "
            f"as root), or pass --data DIR / set {DATA_ENV_VAR}=DIR to a folder holding the four idx .gz files.")
    return folder


# --------------------------------------------------------------------------------------------------------------
# Run folder and stage markers
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunPaths:
    """Where each stage writes, under the `--output` folder."""

    root: Path

    def stage(self, name: str) -> Path:
        return self.root / name

    @property
    def tokenizer_model(self) -> Path:
        return self.root / "tokenizer" / "model.yaml"

    @property
    def tokenizer_weights(self) -> Path:
        from tokenizer.train import EMA_FILE

        return self.root / "tokenizer" / EMA_FILE

    @property
    def shards(self) -> Path:
        return self.root / "extract"

    @property
    def samples(self) -> Path:
        return self.root / "sample" / "samples.npz"

    @property
    def metrics(self) -> Path:
        return self.root / "evaluate" / "metrics.json"

    @property
    def examples(self) -> Path:
        return self.root / "evaluate" / "examples.npz"

    @property
    def report(self) -> Path:
        return self.root / "report"


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_stage_marker(paths: RunPaths, name: str) -> dict[str, Any] | None:
    """The marker of a finished stage (fingerprint, seconds), or None."""
    marker = paths.stage(name) / MARKER_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[["StageContext"], None]
    section: Callable[[PipelineConfig], Any]    # the config this stage's outputs depend on
    reads: tuple[str, ...]                      # the stages whose outputs it reads
    describe: str


@dataclass
class StageContext:
    config: PipelineConfig
    paths: RunPaths
    data_dir: Path
    device: torch.device


# --------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------

def _train_tokenizer(ctx: StageContext) -> None:
    from tokenizer.train import train

    folder = ctx.paths.stage("tokenizer")
    folder.mkdir(parents=True, exist_ok=True)
    ctx.config.tokenizer_model.to_yaml(ctx.paths.tokenizer_model)
    run = ctx.config.tokenizer
    heldout = run.monitor.heldout or dataclasses.replace(run.data, split="test", crop="center", hflip=False,
                                                         num_workers=0)
    run = dataclasses.replace(
        run, model=str(ctx.paths.tokenizer_model),
        data=dataclasses.replace(run.data, path=str(ctx.data_dir)),
        monitor=dataclasses.replace(run.monitor, heldout=dataclasses.replace(heldout, path=str(ctx.data_dir))),
        engine=dataclasses.replace(run.engine, output_dir=str(folder)))
    train(run, config_to_dict(run), resume="auto")


def _load_tokenizer(ctx: StageContext):
    from tokenizer.official import load_released

    return load_released(ctx.paths.tokenizer_weights, ctx.config.tokenizer_model, device=ctx.device)


def _extract(ctx: StageContext) -> None:
    from .extraction import ExtractionSettings, extract_tokens, open_labelled_images

    settings = ctx.config.extract
    images, names = open_labelled_images("fashion_mnist", str(ctx.data_dir), ctx.config.tokenizer_model.tile_size,
                                         split="train", limit=settings.train_images)
    shard_size = -(-len(images) // 4)   # a few shards, so an interrupted extraction keeps most of its work
    extract_tokens(_load_tokenizer(ctx), images, len(names), ExtractionSettings(
        str(ctx.paths.shards), shard_size=shard_size, batch_size=settings.batch_size,
        num_workers=settings.num_workers, hflip=settings.hflip,
        tokenizer_description=f"{ctx.paths.tokenizer_model} {ctx.paths.tokenizer_weights}"))
    (ctx.paths.shards / "classes.json").write_text(json.dumps(names))


def _train_generator(name: str) -> Callable[[StageContext], None]:
    def run(ctx: StageContext) -> None:
        from .training import train

        config: GeneratorRunConfig = getattr(ctx.config, name)
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, shards=str(ctx.paths.shards)),
                                     engine=dataclasses.replace(config.engine, output_dir=str(ctx.paths.stage(name))),
                                     preview=dataclasses.replace(config.preview, every=0))
        train(config, config_to_dict(config), resume="auto")
    return run


def _layout_source(ctx: StageContext):
    """Stage 1 at sampling time: the trained layout model, then calibration (`generator.sampling.ModelLayouts`)."""
    from .sampling import ModelLayouts
    from .training import load_trained

    settings, tokenizer_model = ctx.config.sample, ctx.config.tokenizer_model
    model, space, _ = load_trained(ctx.paths.stage("layout"), device=ctx.device)
    return ModelLayouts(model, space, settings.layout_sampler, settings.seed, tile_size=tokenizer_model.tile_size,
                        min_size=tokenizer_model.partition_min_size)


def _sample(ctx: StageContext) -> None:
    from .sampling import SamplingRun, TokenGenerator, class_balanced_labels, run_sampling
    from .training import load_trained

    settings = ctx.config.sample
    texture_model, texture_space, _ = load_trained(ctx.paths.stage("texture"), device=ctx.device)
    generator = TokenGenerator(texture_model, texture_space, settings.sampler, _layout_source(ctx), settings.seed)
    labels = class_balanced_labels(settings.per_class, NUM_CLASSES)
    run = SamplingRun(str(ctx.paths.stage("sample")), len(labels), settings.batch_size,
                      chunk_size=max(settings.batch_size, len(labels) // 4), description={
                          "seed": settings.seed, "sampler": dataclasses.asdict(settings.sampler),
                          "layout_sampler": dataclasses.asdict(settings.layout_sampler)})
    run_sampling(run, labels, generator, _load_tokenizer(ctx))


@torch.no_grad()
def _reconstruct(tokenizer, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (B, S, S, 3) -> (reconstructions uint8, init geometry (B, N, 5), refined tokens (B, N, 5 + C))."""
    from tqdm.auto import tqdm

    from tokenizer.images import to_uint8

    outputs, geometry, tokens = [], [], []
    for start in tqdm(range(0, len(images), batch_size), desc="reconstruct", unit="batch", dynamic_ncols=True):
        tokenization = tokenizer.tokenize(images[start:start + batch_size])
        outputs.append(to_uint8(tokenizer.decode(tokenization.tokens)))
        geometry.append(tokenization.init_geometry.cpu().numpy())
        tokens.append(tokenization.tokens.float().cpu().numpy())
    return np.concatenate(outputs), np.concatenate(geometry), np.concatenate(tokens)


def _sample_metrics(ctx: StageContext, reference: Path) -> tuple[dict[str, float], dict[str, str]]:
    """FID (and the other ADM-protocol numbers) of the samples against test images; unavailable without the
    offline Inception weights, never estimated."""
    from eval.evaluate import evaluate_samples
    from eval.inception import InceptionFeatureExtractor

    try:
        extractor = InceptionFeatureExtractor()
    except FileNotFoundError as error:
        reason = f"no offline Inception weights ({str(error).splitlines()[0]})"
        return {}, {key: reason for key in ("fid", "sfid", "precision", "recall")}
    result = evaluate_samples(ctx.paths.samples, reference, extractor=extractor,
                              batch_size=ctx.config.evaluate.batch_size, device=str(ctx.device),
                              cache_dir=ctx.paths.stage("evaluate") / "inception_cache")
    result["unavailable"].pop("inception_score", None)   # not reported: ImageNet classes mean nothing here
    metrics = {k: v for k, v in result["metrics"].items() if not k.startswith("inception_score")}
    return metrics, result["unavailable"]


def _evaluate(ctx: StageContext) -> None:
    from eval.layout import layout_report
    from eval.metrics import psnr, ssim

    from .extraction import open_labelled_images
    from .sampling import class_balanced_labels

    settings, folder = ctx.config.evaluate, ctx.paths.stage("evaluate")
    folder.mkdir(parents=True, exist_ok=True)
    count = max(settings.reconstruction_images, settings.fid_reference_images)
    test, names = open_labelled_images("fashion_mnist", str(ctx.data_dir), ctx.config.tokenizer_model.tile_size,
                                       split="test", limit=count)
    count = len(test)
    images, labels = np.stack([test[i][0] for i in range(count)]), test.labels[:count]
    held_out = images[:settings.reconstruction_images]
    reconstructions, init_geometry, tokens = _reconstruct(_load_tokenizer(ctx), held_out, settings.batch_size)
    metrics: dict[str, Any] = {"psnr": float(np.mean(psnr(reconstructions, held_out))),
                               "ssim": float(np.mean(ssim(reconstructions, held_out)))}
    shown = np.concatenate([np.flatnonzero(labels[:len(held_out)] == c)[:settings.examples_per_class]
                            for c in range(NUM_CLASSES)])
    np.savez(ctx.paths.examples, originals=held_out[shown], reconstructions=reconstructions[shown],
             init_geometry=init_geometry[shown], tokens=tokens[shown], labels=labels[shown])

    reference = folder / "reference.npz"
    np.savez(reference, arr_0=images[:settings.fid_reference_images])
    sample_metrics, unavailable = _sample_metrics(ctx, reference)
    metrics.update(sample_metrics)

    layouts = _layout_source(ctx)
    sample_labels = class_balanced_labels(ctx.config.sample.per_class, NUM_CLASSES)
    generated = layouts.layouts(sample_labels.tolist(), list(range(len(sample_labels)))).numpy()
    layout = layout_report(generated, init_geometry, sample_labels, labels[:len(held_out)], calibrate=False,
                           tile_size=ctx.config.tokenizer_model.tile_size,
                           min_size=ctx.config.tokenizer_model.partition_min_size)
    metrics["layout_fd"] = layout["frechet_distance"]
    metrics["layout_exact_fraction"] = layouts.exact / layouts.count
    ctx.paths.metrics.write_text(json.dumps({
        "metrics": metrics, "unavailable": unavailable, "class_names": names,
        "counts": {"reconstruction_images": len(held_out), "fid_samples": len(sample_labels),
                   "fid_reference_images": settings.fid_reference_images, "layouts": len(generated)},
        "layout_fd_per_class": layout["frechet_distance_per_class"]}, indent=1))


def _report(ctx: StageContext) -> None:
    from .report import write_report

    write_report(ctx.paths, ctx.config)


STAGES: tuple[Stage, ...] = (
    Stage("tokenizer", _train_tokenizer, lambda c: (c.tokenizer_model, c.tokenizer), (),
          "train the tokenizer (entropy partition + encoder + splat renderer + decoder)"),
    Stage("extract", _extract, lambda c: c.extract, ("tokenizer",), "encode the training images into token shards"),
    Stage("layout", _train_generator("layout"), lambda c: c.layout, ("extract",), "train the layout model"),
    Stage("texture", _train_generator("texture"), lambda c: c.texture, ("extract",), "train the texture model"),
    Stage("sample", _sample, lambda c: c.sample, ("tokenizer", "layout", "texture"),
          "sample every class: layout model -> calibration -> texture model -> decoder"),
    Stage("evaluate", _evaluate, lambda c: c.evaluate, ("tokenizer", "sample"),
          "reconstruction PSNR/SSIM, FID of the samples, layout distance"),
    Stage("report", _report, lambda c: None, ("tokenizer", "layout", "texture", "sample", "evaluate"),
          "write the HTML page and metrics.json"),
)


def _stage_fingerprints(config: PipelineConfig) -> dict[str, str]:
    prints: dict[str, str] = {}
    for stage in STAGES:
        section = stage.section(config)
        plain = config_to_dict(section) if dataclasses.is_dataclass(section) else \
            [config_to_dict(s) for s in section] if isinstance(section, tuple) else section
        prints[stage.name] = _fingerprint(stage.name, plain, [prints[r] for r in stage.reads])
    return prints


def run_pipeline(config: PipelineConfig, output: str | Path, data_dir: Path,
                 device: str | torch.device | None = None) -> dict[str, dict[str, Any]]:
    """Run every unfinished stage in order; returns each stage's marker (fingerprint, seconds, skipped)."""
    paths = RunPaths(Path(output))
    paths.root.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = StageContext(config, paths, data_dir, device)
    fingerprints = _stage_fingerprints(config)
    summary: dict[str, dict[str, Any]] = {}
    for number, stage in enumerate(STAGES, 1):
        marker = read_stage_marker(paths, stage.name)
        header = f"[{number}/{len(STAGES)}] {stage.name}: {stage.describe}"
        if marker is not None:
            if marker["fingerprint"] != fingerprints[stage.name]:
                raise PipelineError(
                    f"{paths.stage(stage.name)} was finished with another config (or from other upstream "
                    f"outputs); use another --output folder, or delete that folder and the ones after it")
            print(f"{header} -- done already ({marker['seconds']:.0f} s), skipped", flush=True)
            summary[stage.name] = {**marker, "skipped": True}
            continue
        print(header, flush=True)
        start = time.perf_counter()
        stage.run(ctx)
        marker = {"fingerprint": fingerprints[stage.name], "seconds": time.perf_counter() - start}
        (paths.stage(stage.name) / MARKER_FILE).write_text(json.dumps(marker))
        print(f"[{number}/{len(STAGES)}] {stage.name}: finished in {marker['seconds']:.0f} s", flush=True)
        summary[stage.name] = {**marker, "skipped": False}
    if read_stage_marker(paths, "report") is not None and not summary["report"]["skipped"]:
        print(f"report: {paths.report / 'index.html'}", flush=True)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pipeline_fashion.yaml", help="pipeline YAML")
    parser.add_argument("--output", required=True, help="run folder (rerun the same command to resume)")
    parser.add_argument("--data", help=f"Fashion-MNIST idx folder (default ${DATA_ENV_VAR}, then "
                                       f"{FASHION_MNIST_DIR})")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_pipeline_config(args.config)
        data_dir = resolve_data_dir(args.data, config)
        started = time.perf_counter()
        run_pipeline(config, args.output, data_dir, args.device)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training machinery shared by every trainer of the suite (tokenizer and generator).

What lives here, and nothing else:
- typed configs from YAML with `key.sub=value` overrides (`load_run_config`, from `tokenizer.yaml_config`);
- `TrainingEngine`: accelerate set-up (processes, devices, bf16 autocast, gradient accumulation), the speed
  switches (`torch.compile`, channels-last, TF32, cuDNN autotuning), seeding, EMA of the weights (diffusers'
  `EMAModel`), a NaN guard without per-step host syncs, atomic checkpoints through `accelerator.save_state`
  with keep-last-K and `--resume auto`, JSONL + TensorBoard logs, a tqdm progress bar with images/s, an
  optional torch.profiler window, and export of the EMA weights as safetensors;
- `ShardedInfiniteSampler`: the data order as a pure function of (seed, position), so a resumed run sees
  exactly the samples an uninterrupted run would have seen, and each process gets a disjoint share.

A trainer owns its models, losses and the order of its optimizer steps; it calls the engine for everything
else. The loop of a trainer reads:

    engine = TrainingEngine(config.engine, run_config=raw_config)
    model, optimizer = engine.prepare(model, optimizer)
    engine.track_ema(model)
    start = engine.resume(args.resume)
    batches = engine.batches(dataset, batch_size, num_workers, start_step=start)
    for step in engine.steps(start):
        metrics = engine.optimizer_step(step, model, optimizer, loss_fn, batches)
        engine.update_ema(model)
        engine.end_step(step, metrics)
    engine.finish()

The NaN guard: every loss term is checked for NaN/inf on the device; the flags are read back (one host sync)
only at log steps, before every checkpoint and before the EMA export, so the run stops at the first of those
after a bad step, names the first bad step and term, and never writes a checkpoint after a bad step.

Checkpoint layout: `<output_dir>/checkpoints/step_<08d>/` holds accelerate's state (models, optimizers, RNG of
every process, registered objects such as the EMA) plus `progress.json`. A checkpoint is written into a hidden
temporary folder and renamed into place only once complete, so a killed run never leaves a half checkpoint
that `--resume auto` would pick up.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

# Trainers take their config loading from here too, so one import serves a training script.
from .yaml_config import apply_overrides, build_config, config_to_dict, load_run_config  # noqa: F401

logger = logging.getLogger("gpstoken.train")

CHECKPOINT_PREFIX = "step_"
PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.jsonl"
PROFILE_FILE = "profile.txt"


# --------------------------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------------------------

class ShardedInfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of `(index, draw_seed)` for one process.

    Epoch e is a permutation of the dataset drawn from `(seed, e)`; its first `n - n % num_shards` items are
    dealt round-robin to the shards, so the shards are disjoint within an epoch and the union of the shards'
    k-th batches is the k-th global batch of a single-process run with the same global batch size.
    `draw_seed` is unique per (epoch, index) and seeds the dataset's random augmentation, so augmentation does
    not depend on workers or on where a run was resumed. `start` skips that many items of this shard.
    """

    def __init__(self, num_items: int, seed: int, num_shards: int = 1, shard_index: int = 0, start: int = 0):
        if num_items < num_shards:
            raise ValueError(f"dataset of {num_items} items cannot be split over {num_shards} processes")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} outside [0, {num_shards})")
        self.num_items, self.seed = num_items, seed
        self.num_shards, self.shard_index, self.start = num_shards, shard_index, start
        self.per_shard = num_items // num_shards

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        usable = self.per_shard * self.num_shards
        return torch.randperm(self.num_items, generator=generator)[self.shard_index:usable:self.num_shards]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_shard)
        while True:
            order = self.epoch_order(epoch).tolist()
            for index in order[offset:]:
                yield index, (self.seed << 32) + epoch * self.num_items + index
            epoch, offset = epoch + 1, 0


# --------------------------------------------------------------------------------------------------------------
# Speed switches and the profiler window
# --------------------------------------------------------------------------------------------------------------

def _backend_flags() -> tuple[bool, bool, bool]:
    """(TF32 for cuBLAS matmuls, TF32 for cuDNN convolutions, cuDNN autotuning) as set now."""
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)


def _set_backend_flags(matmul_tf32: bool, conv_tf32: bool, benchmark: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.backends.cudnn.allow_tf32 = conv_tf32
    torch.backends.cudnn.benchmark = benchmark


def _contiguous_state_dict(module: torch.nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    """State-dict hook of channels-last modules: contiguous copies, as safetensors requires."""
    for key, value in state.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor) and not value.is_contiguous():
            state[key] = value.contiguous()


def covered_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: overlapping kernels (several streams) count once."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


class _ProfileWindow:
    """torch.profiler over a few training steps, written as tables of the top CUDA kernels and operators
    (CPU operators on a machine without CUDA), with the GPU's busy share of the window and its host syncs."""

    ROWS = 25

    def __init__(self, device: torch.device):
        from torch.profiler import ProfilerActivity, profile

        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.profiler = profile(activities=activities, record_shapes=True)
        self.profiler.__enter__()
        self.warnings = warnings.catch_warnings(record=True)
        self.caught = self.warnings.__enter__()
        warnings.simplefilter("always")
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")   # every host sync inside the window becomes a warning
        self.start = time.perf_counter()

    def stop(self) -> float:
        """End the window; returns its wall-clock seconds."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("default")
        seconds = time.perf_counter() - self.start
        self.warnings.__exit__(None, None, None)
        self.profiler.__exit__(None, None, None)
        return seconds

    def kernel_activity(self) -> tuple[float, dict[str, tuple[float, int]]]:
        """Seconds during which at least one CUDA kernel ran (the union of kernel intervals), and per kernel
        name (total microseconds, calls). The annotations torch.compile puts around each compiled graph
        ("## Call CompiledFxGraph ... ##") span their kernels and the idle gaps between them: left out."""
        from torch.autograd import DeviceType

        intervals, kernels = [], {}
        for event in self.profiler.events():
            if event.device_type != DeviceType.CUDA or event.is_user_annotation or event.name.startswith("## "):
                continue
            start, end = event.time_range.start, event.time_range.end
            intervals.append((start, end))
            us, calls = kernels.get(event.name, (0.0, 0))
            kernels[event.name] = (us + end - start, calls + 1)
        return covered_length(intervals) / 1e6, kernels

    def finish(self, path: Path, first_step: int, last_step: int) -> dict[str, float]:
        """Stop, write the tables to `path`; returns the GPU busy time and host syncs per step (CUDA only)."""
        seconds = self.stop()
        syncs = sum("synchronizing CUDA operation" in str(w.message) for w in self.caught)
        events = self.profiler.key_averages()
        steps = last_step - first_step + 1
        lines = [f"torch.profiler over steps {first_step}-{last_step} ({steps} steps, {seconds:.3f} s wall, "
                 "profiler overhead included)"]
        if self.cuda:
            busy, kernels = self.kernel_activity()
            lines += [f"GPU busy (kernels, annotations excluded) {busy:.3f} s = {100 * busy / seconds:.0f}% of the "
                      f"wall time ({1000 * busy / steps:.1f} ms per step); host syncs in the window: {syncs}", "",
                      f"Top {self.ROWS} CUDA kernels by GPU time:",
                      f"{'GPU ms':>10} {'share':>6} {'calls':>7} {'us/call':>9}  kernel"]
            total_kernel_us = max(sum(us for us, _ in kernels.values()), 1e-9)
            for name, (us, calls) in sorted(kernels.items(), key=lambda item: -item[1][0])[:self.ROWS]:
                lines.append(f"{us / 1000:10.2f} {100 * us / total_kernel_us:5.1f}% {calls:7d} "
                             f"{us / calls:9.1f}  {name[:150]}")
            sort = "device_time_total"
            summary = {"profile_gpu_busy_ms_per_step": 1000 * busy / steps,
                       "profile_gpu_busy_share": busy / seconds,
                       "profile_host_syncs_per_step": syncs / steps}
            lines += ["", f"Top {self.ROWS} operators by self CPU time (the host's share of a launch-bound step):",
                      events.table(sort_by="self_cpu_time_total", row_limit=self.ROWS, max_name_column_width=70)]
        else:
            sort = "self_cpu_time_total"
            summary = {}
        lines += ["", f"Top {self.ROWS} operators by {sort} (nested operators repeat their children's time):",
                  events.table(sort_by=sort, row_limit=self.ROWS, max_name_column_width=70),
                  f"Top {self.ROWS} operators and input shapes by {sort}:",
                  self.profiler.key_averages(group_by_input_shape=True).table(
                      sort_by=sort, row_limit=self.ROWS, max_name_column_width=50, max_shapes_column_width=70)]
        path.write_text("\n".join(lines) + "\n")
        return summary


# --------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------

@dataclass
class EngineConfig:
    """Run-level settings every trainer shares."""

    output_dir: str = "runs/default"
    max_steps: int = 1000               # optimizer steps (of the main model)
    seed: int = 0
    mixed_precision: str = "no"         # "no" (fp32) or "bf16" autocast
    grad_accum_steps: int = 1           # micro-batches per optimizer step
    grad_clip_norm: float = 0.0         # 0 disables clipping
    ema_decay: float = 0.9999           # diffusers EMAModel decay (with its built-in (1+t)/(10+t) warm-up)
    checkpoint_every: int = 5000        # steps between checkpoints; the last step is always saved
    keep_checkpoints: int = 3           # keep the newest K complete checkpoints
    log_every: int = 50                 # steps between scalar log records (and NaN-guard reads)
    compile: bool = False               # torch.compile (inductor, dynamic=False): models, or parts a trainer names
    channels_last: bool = False         # the conv networks a trainer names in channels-last memory format
    activation_checkpointing: bool = False  # recompute in the backward the activations of the stages a trainer
                                            # names instead of keeping them (less memory, more compute)
    tf32: bool = True                   # CUDA fp32 matmuls and convolutions on TF32 tensor cores (false: strict fp32)
    cudnn_benchmark: bool = True        # cuDNN times its algorithms once per shape and keeps the fastest
    deterministic: bool = False         # deterministic kernels (slower; for exact-resume checks; no cuDNN timing)
    profile_at: int = 0                 # profile steps profile_at+1 .. profile_at+profile_steps (0 = never)
    profile_steps: int = 3              # into <output_dir>/profile.txt (top kernels and operators)

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"engine.mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        for key in ("max_steps", "grad_accum_steps", "checkpoint_every", "keep_checkpoints", "log_every",
                    "profile_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"engine.{key} must be >= 1, got {getattr(self, key)}")
        if self.profile_at < 0:
            raise ValueError(f"engine.profile_at must be >= 0, got {self.profile_at}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"engine.ema_decay must be in [0, 1), got {self.ema_decay}")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the run stops without writing a checkpoint."""

    def __init__(self, step: int, name: str, value: float, last_checkpoint: Path | None):
        self.step, self.name, self.value, self.last_checkpoint = step, name, value, last_checkpoint
        kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(f"loss '{name}' is {value} at step {step}; training stopped ({kept})")


def find_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `<output_dir>/checkpoints`, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / PROGRESS_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The JSONL log records of a run."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TrainingEngine:
    """One training run: processes and devices, EMA, checkpoints, logs, progress, NaN guard."""

    def __init__(self, config: EngineConfig, run_config: Mapping[str, Any] | None = None):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # several CPU processes then talk through gloo
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum_steps,
            dynamo_backend="no",   # compilation is engine.compile's alone (`prepare`, `compile_module`)
            step_scheduler_with_optimizer=False,
            # DDP must not overwrite module buffers at each forward: the GAN discriminator runs twice (real, fake)
            # before one backward, and BatchNorm's backward reads the running statistics that a broadcast at the
            # second forward would change in place (autograd then refuses the backward). Each process keeps its own
            # running statistics; no model here uses them in training.
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
        self._was_deterministic = torch.are_deterministic_algorithms_enabled()
        self._previous_backend_flags = _backend_flags()   # restored by finish()
        _set_backend_flags(config.tf32, config.tf32, config.cudnn_benchmark and not config.deterministic)
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        set_seed(config.seed, device_specific=False, deterministic=config.deterministic)
        self.ema: EMAModel | None = None
        self._ema_model: torch.nn.Module | None = None
        self._tensorboard = None
        self._log_file_handler: logging.Handler | None = None
        self._progress = None
        self._last_time = None
        self._last_step = 0
        self._images = 0                  # images trained on since the last log record (this process)
        self._data_wait = 0.0             # seconds spent waiting for batches since the last log record
        self._unchecked: list[tuple[int, list[str], torch.Tensor]] = []   # NaN-guard values not yet read
        self._profiler: _ProfileWindow | None = None
        if self.is_main_process:
            (self.output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            self._setup_logging()
            if run_config is not None:
                with open(self.output_dir / "config.yaml", "w", encoding="utf-8") as handle:
                    yaml.safe_dump(dict(run_config), handle, sort_keys=False)
        self.accelerator.wait_for_everyone()
        logger.info("run in %s: %d process(es) on %s, mixed precision %s", self.output_dir,
                    self.num_processes, self.device, config.mixed_precision)

    # ---- processes ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def prepare(self, *objects: Any, compile_models: bool = True) -> Any:
        """Hand models and optimizers to accelerate (device placement, DDP, autocast). With `engine.compile`,
        each prepared model is then compiled whole (`torch.compile`, inductor, `dynamic=False`), unless
        `compile_models=False`: a trainer that compiles chosen parts itself (`compile_module`)."""
        prepared = self.accelerator.prepare(*objects)
        if not (self.config.compile and compile_models):
            return prepared
        items = [prepared] if len(objects) == 1 else list(prepared)
        items = [torch.compile(item, dynamic=False) if isinstance(item, torch.nn.Module) else item for item in items]
        return items[0] if len(objects) == 1 else tuple(items)

    def compile_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """With `engine.compile`, compile `module` in place (`nn.Module.compile`: inductor, `dynamic=False`);
        its parameters, state dict and checkpoints stay as they are."""
        if self.config.compile:
            module.compile(dynamic=False)
        return module

    @property
    def memory_format(self) -> torch.memory_format:
        """The memory format of conv inputs: channels-last with `engine.channels_last`."""
        return torch.channels_last if self.config.channels_last else torch.contiguous_format

    def to_memory_format(self, module: torch.nn.Module) -> torch.nn.Module:
        """With `engine.channels_last`, put `module`'s 4-d weights in channels-last memory format (in place);
        its state dict still holds contiguous tensors, as safetensors checkpoints require."""
        if self.config.channels_last:
            module.to(memory_format=torch.channels_last)
            module.register_state_dict_post_hook(_contiguous_state_dict)
        return module

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    # ---- EMA ------------------------------------------------------------------------------------------------
    def track_ema(self, model: torch.nn.Module) -> EMAModel:
        """Start an EMA of `model`'s parameters (saved with every checkpoint, exported by `export_ema`)."""
        self._ema_model = self.accelerator.unwrap_model(model, keep_torch_compile=False)  # the model's own key names
        self.ema = EMAModel(self._ema_model.parameters(), decay=self.config.ema_decay, foreach=True)
        self.accelerator.register_for_checkpointing(self.ema)
        return self.ema

    def update_ema(self) -> None:
        """One EMA step; call after each optimizer step of the tracked model."""
        self.ema.step(self._ema_model.parameters())

    def export_ema(self, path: str | Path) -> Path:
        """Write the EMA weights as a safetensors state dict with the model's own key names."""
        path = Path(path)
        self.verify_finite()
        if self.is_main_process:
            params = list(self._ema_model.parameters())
            self.ema.store(params)
            self.ema.copy_to(params)
            state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self._ema_model.state_dict().items()}
            self.ema.restore(params)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.tmp")
            save_file(state, str(temporary), metadata={"format": "pt", "ema_decay": str(self.config.ema_decay)})
            os.replace(temporary, path)
            logger.info("exported EMA weights to %s", path)
        self.accelerator.wait_for_everyone()
        return path

    # ---- data -----------------------------------------------------------------------------------------------
    def batches(self, dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int = 0,
                start_step: int = 0, collate_fn: Callable | None = None) -> Iterator[Any]:
        """Endless iterator of this process's micro-batches, positioned for `start_step` (see
        `ShardedInfiniteSampler`). The dataset is indexed with `(index, draw_seed)` pairs."""
        per_step = batch_size * self.config.grad_accum_steps
        sampler = ShardedInfiniteSampler(len(dataset), self.config.seed, self.num_processes,
                                         self.accelerator.process_index, start=start_step * per_step)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
            collate_fn=collate_fn, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if num_workers else None,
            generator=torch.Generator().manual_seed(self.config.seed),  # keeps the global RNG untouched
        )
        return self._timed(iter(loader))

    def _timed(self, batches: Iterator[Any]) -> Iterator[Any]:
        """`batches`, adding the time spent waiting for each to the `data_wait_ms` of the log records."""
        while True:
            start = time.perf_counter()
            batch = next(batches)
            self._data_wait += time.perf_counter() - start
            yield batch

    # ---- steps ----------------------------------------------------------------------------------------------
    def steps(self, start_step: int) -> Iterator[int]:
        """Step numbers `start_step + 1 .. max_steps` with a progress bar (main process), and the profiler
        window when `engine.profile_at` is set."""
        self._progress = tqdm(total=self.config.max_steps, initial=start_step, disable=not self.is_main_process,
                              unit="step", dynamic_ncols=True, desc="train")
        self._last_time, self._last_step = time.perf_counter(), start_step
        profile_first = self.config.profile_at + 1 if self.config.profile_at else 0
        profile_last = min(self.config.profile_at + self.config.profile_steps, self.config.max_steps)
        for step in range(start_step + 1, self.config.max_steps + 1):
            if step == profile_first and self.is_main_process:
                self._profiler = _ProfileWindow(self.device)
            yield step
            if step == profile_last and self._profiler is not None:
                summary = self._profiler.finish(self.output_dir / PROFILE_FILE, first_step=profile_first,
                                                last_step=step)
                self._profiler = None
                if summary:
                    self.log_scalars(step, summary)
                logger.info("profile of steps %d-%d written to %s", profile_first, step,
                            self.output_dir / PROFILE_FILE)

    def optimizer_step(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       loss_fn: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                       batches: Iterator[Any]) -> dict[str, torch.Tensor]:
        """One optimizer step of `model` over `grad_accum_steps` micro-batches drawn from `batches`.

        `loss_fn(batch) -> (loss, terms)` runs under autocast; every term and the loss (and the gradient norm
        when clipping) go to the NaN guard (`check_finite`). Returns the terms averaged over the micro-batches
        (detached, on the device) plus `grad_norm` when clipping is on."""
        accumulated: dict[str, torch.Tensor] = {}
        for _ in range(self.config.grad_accum_steps):
            batch = next(batches)
            with self.accelerator.accumulate(model), self.accelerator.autocast():
                loss, terms = loss_fn(batch)
                self.check_finite(step, {**terms, "loss": loss})
                self.accelerator.backward(loss)
            for name, value in {**terms, "loss": loss}.items():
                accumulated[name] = accumulated.get(name, 0.0) + value.detach().float() / self.config.grad_accum_steps
        if self.config.grad_clip_norm > 0:
            norm = self.accelerator.clip_grad_norm_(model.parameters(), self.config.grad_clip_norm)
            accumulated["grad_norm"] = norm.detach().float()
            self.check_finite(step, {"grad_norm": norm})   # a NaN gradient behind finite losses
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return accumulated

    def check_finite(self, step: int, terms: Mapping[str, torch.Tensor]) -> None:
        """Queue scalar `terms` of step `step` for the NaN guard; no host sync (see `verify_finite`)."""
        names = list(terms)
        values = torch.stack([terms[n].detach().float().reshape(()) for n in names])
        self._unchecked.append((step, names, values))

    def verify_finite(self) -> None:
        """Read the queued NaN-guard values back (one host sync) and raise `NonFiniteLossError` on every
        process, naming the first step and term that was NaN/inf on any process."""
        if not self._unchecked:
            return
        queued, self._unchecked = self._unchecked, []
        values = torch.cat([v for _, _, v in queued])
        bad = (~torch.isfinite(values)).float()
        if self.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        flags, numbers = torch.stack([bad, values]).tolist()
        position = 0
        for step, names, _ in queued:
            for name in names:
                if flags[position]:
                    checkpoints = find_checkpoints(self.output_dir)
                    error = NonFiniteLossError(step, name, numbers[position], checkpoints[-1] if checkpoints else None)
                    logger.error(str(error))
                    raise error
                position += 1

    def end_step(self, step: int, metrics: Mapping[str, torch.Tensor | float], images: int | None = None) -> None:
        """Bookkeeping after step `step`: progress bar, scalar logs every `log_every`, checkpoint every
        `checkpoint_every` and at the last step; the NaN guard is read before either. `images` = images this
        process trained the main model on in the step (0 for a step that trains something else). A record holds
        the metrics (averaged over processes), `images_per_s` (all processes), `data_wait_ms` (host time spent
        waiting for batches, per step) and on CUDA `peak_memory_gib` (peak allocated since the last record)."""
        self._progress.update(1)
        self._images += images or 0
        log = step % self.config.log_every == 0 or step == self.config.max_steps
        save = step % self.config.checkpoint_every == 0 or step == self.config.max_steps
        if log or save:
            self.verify_finite()
        if log:
            now = time.perf_counter()
            record = self._mean_over_processes(metrics)
            elapsed, steps = max(now - self._last_time, 1e-9), step - self._last_step
            if images is not None:
                rate = self._images * self.num_processes / elapsed
                record["images_per_s"] = rate
                self._progress.set_postfix(img_s=f"{rate:.1f}", loss=f"{record.get('loss', math.nan):.4f}")
            record["data_wait_ms"] = 1000.0 * self._data_wait / steps
            if self.device.type == "cuda":   # the peak of this log window (not of the first steps' autotuning)
                record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                torch.cuda.reset_peak_memory_stats(self.device)
            self._last_time, self._last_step, self._images, self._data_wait = now, step, 0, 0.0
            self.log_scalars(step, record)
        if save:
            self.save_checkpoint(step)

    def _mean_over_processes(self, metrics: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
        """The metrics as floats, averaged over the processes (one reduction and one host read in all)."""
        names = list(metrics)
        if not names:
            return {}
        values = torch.stack([torch.as_tensor(metrics[n], dtype=torch.float32, device=self.device).reshape(())
                              for n in names])
        if self.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(names, values.tolist()))

    # ---- logs -----------------------------------------------------------------------------------------------
    def _setup_logging(self) -> None:
        logger.setLevel(logging.INFO)
        self._log_file_handler = logging.FileHandler(self.output_dir / "train.log")
        self._log_file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(self._log_file_handler)
        if not any(type(h) is logging.StreamHandler for h in logger.handlers):
            console = logging.StreamHandler()
            console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
            logger.addHandler(console)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra; JSONL always works
            logger.warning("tensorboard is not installed: scalars go to %s only", METRICS_FILE)
            return
        self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))

    def log_scalars(self, step: int, record: Mapping[str, float]) -> None:
        """Append one JSONL record and the TensorBoard scalars (main process)."""
        if not self.is_main_process:
            return
        with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **record}) + "\n")
        if self._tensorboard is not None:
            for name, value in record.items():
                self._tensorboard.add_scalar(f"train/{name}", value, step)

    def log_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Save an uint8 (H, W, 3) image as PNG under `images/` and to TensorBoard (main process)."""
        if not self.is_main_process:
            return
        from PIL import Image

        folder = self.output_dir / "images"
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{tag}_{step:08d}.png")
        if self._tensorboard is not None:
            self._tensorboard.add_image(tag, image, step, dataformats="HWC")

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        """Write the full training state atomically and keep only the newest `keep_checkpoints`."""
        self.verify_finite()   # never save the state of a step the NaN guard has not passed
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
        temporary = root / f".tmp_{CHECKPOINT_PREFIX}{step:08d}"
        if self.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(temporary))
        self.accelerator.wait_for_everyone()
        if self.is_main_process:
            (temporary / PROGRESS_FILE).write_text(json.dumps({"step": step}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
            for old in find_checkpoints(self.output_dir)[:-self.config.keep_checkpoints]:
                shutil.rmtree(old)
            if self._tensorboard is not None:
                self._tensorboard.flush()
            logger.info("checkpoint %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def resume(self, resume: str | None) -> int:
        """Restore a checkpoint; returns the step it holds (0 for a fresh run).

        `resume`: None for a fresh run (refused when the output folder already holds checkpoints), "auto" for
        the newest complete checkpoint of this run if any, or the path of a checkpoint folder. Call after
        `prepare` and `track_ema`. Log records after the restored step are dropped, so the JSONL and
        TensorBoard histories read as one uninterrupted run."""
        existing = find_checkpoints(self.output_dir)
        if resume is None or resume == "none":
            if existing:
                raise FileExistsError(f"{self.output_dir} already holds checkpoints (newest {existing[-1].name}); "
                                      "pass --resume auto to continue it or choose another output folder")
            return self._start_logs_at(0)
        if resume == "auto":
            if not existing:
                logger.info("--resume auto: no checkpoint in %s, starting from scratch", self.output_dir)
                return self._start_logs_at(0)
            path = existing[-1]
        else:
            path = Path(resume)
            if not (path / PROGRESS_FILE).is_file():
                raise FileNotFoundError(f"{path} is not a complete checkpoint (no {PROGRESS_FILE})")
        self.accelerator.load_state(str(path))
        if self.ema is not None:
            self.ema.to(self.device)
        step = json.loads((path / PROGRESS_FILE).read_text())["step"]
        logger.info("resumed from %s (step %d)", path, step)
        return self._start_logs_at(step)

    def _start_logs_at(self, step: int) -> int:
        if self.is_main_process:
            for stale in (self.output_dir / "checkpoints").glob(f".tmp_{CHECKPOINT_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving
            records = [r for r in read_metrics(self.output_dir) if r["step"] <= step]
            lines = "".join(json.dumps(r) + "\n" for r in records)
            (self.output_dir / METRICS_FILE).write_text(lines)
            if self._tensorboard is not None:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard.close()
                self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=step + 1)
        self.accelerator.wait_for_everyone()
        return step

    def finish(self) -> None:
        """Close the progress bar and the logs; wait for all processes."""
        if self._profiler is not None:   # the run ended inside the profiler window
            self._profiler.stop()
            self._profiler = None
        if self._progress is not None:
            self._progress.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._log_file_handler is not None:
            logger.removeHandler(self._log_file_handler)
            self._log_file_handler.close()
        torch.use_deterministic_algorithms(self._was_deterministic)
        _set_backend_flags(*self._previous_backend_flags)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

"""A toy trainer over tokenizer.engine, run as a script by tests/test_engine.py (also under accelerate launch).

A small MLP learns a fixed linear map from noisy inputs; the noise is drawn from each sample's draw seed, so the
run is a pure function of the seed and exercises the same data path as the real trainers.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from tokenizer.engine import EngineConfig, NonFiniteLossError, TrainingEngine


class NoisyLinearPairs(torch.utils.data.Dataset):
    def __init__(self, size: int = 64, dim: int = 8):
        generator = torch.Generator().manual_seed(1234)
        self.inputs = torch.randn(size, dim, generator=generator)
        self.targets = self.inputs @ torch.randn(dim, dim, generator=generator)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, draw_seed = key
        noise = 0.1 * torch.randn(self.inputs.shape[1], generator=torch.Generator().manual_seed(draw_seed))
        return self.inputs[index] + noise, self.targets[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--nan-at", type=int, default=0, help="make the loss NaN at this step")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step (to be killed mid-run)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--profile-at", type=int, default=0)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical float sums in and out of a subprocess
    try:
        return train(args)
    finally:
        torch.set_num_threads(threads)


def train(args: argparse.Namespace) -> int:

    config = EngineConfig(output_dir=args.output, max_steps=args.steps, seed=7, grad_accum_steps=args.accum,
                          grad_clip_norm=1.0, ema_decay=0.9, checkpoint_every=args.checkpoint_every,
                          keep_checkpoints=args.keep, log_every=args.log_every, deterministic=True,
                          profile_at=args.profile_at, profile_steps=2)
    engine = TrainingEngine(config, run_config={"toy": True})
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.5, 0.9))
        model, optimizer = engine.prepare(model, optimizer)
        engine.track_ema(model)
        start = engine.resume(args.resume)
        batches = engine.batches(NoisyLinearPairs(), args.batch, num_workers=args.workers, start_step=start)

        def loss_fn(step: int):
            def compute(batch):
                inputs, targets = (t.to(engine.device) for t in batch)
                mse = torch.nn.functional.mse_loss(model(inputs), targets)
                if step == args.nan_at:
                    mse = mse * float("nan")
                jitter = 1e-3 * torch.rand((), device=engine.device)  # exercises the restored RNG state
                return mse + jitter, {"mse": mse}
            return compute

        for step in engine.steps(start):
            metrics = engine.optimizer_step(step, model, optimizer, loss_fn(step), batches)
            engine.update_ema()
            engine.end_step(step, metrics, images=args.batch * args.accum)
            time.sleep(args.sleep)
        engine.export_ema(f"{args.output}/ema.safetensors")
    except NonFiniteLossError as error:
        print(f"STOPPED: {error}", file=sys.stderr)
        return 3
    finally:
        engine.finish()
    return 0

if __name__ == "__main__":
    sys.exit(main())

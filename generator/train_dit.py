"""Train the texture model (or the one-stage baseline) on extracted token shards.

    accelerate launch generator/train_dit.py --config configs/dit_xl_m128.yaml [--resume auto] [key.sub=value ...]

See generator/training.py for the loss and the run directory, configs/dit_*.yaml for the recipes.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.training import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, ("texture", "one_stage"), "Flow-matching training of the texture model on token shards")


if __name__ == "__main__":
    sys.exit(main())

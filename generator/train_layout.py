"""Train the layout model (stage 1) on the init geometry stored in token shards; no tokenizer needed.

    accelerate launch generator/train_layout.py --config configs/layout_s.yaml [--resume auto] [key.sub=value ...]

Same machinery as generator/train_dit.py. The layouts are sorted into a canonical raster order of the token
centres and the model has a learned positional embedding: generator/spaces.py explains the choice.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.training import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, ("layout",), "Flow-matching training of the layout model on token shards")


if __name__ == "__main__":
    sys.exit(main())

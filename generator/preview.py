"""Sample grids during training: the EMA model's samples for a fixed set of labels and seeds, as pixels.

Texture stage: real layouts of those classes from the training shards condition the texture model, the tokens
are decoded by the tokenizer. One-stage: decoded samples. Layout stage (no tokenizer needed): each sampled layout after calibration, drawn as
token ellipses on grey. Labels cycle through the first classes; the seeds are fixed, so successive grids show
the same samples as the training progresses.
"""
from __future__ import annotations

import numpy as np
import torch

from tokenizer.images import to_uint8
from tokenizer.viz import draw_tokens, image_grid

from .models import FlowTransformer
from .sampling import ModelLayouts, ShardLayouts, TokenGenerator
from .shards import TokenShards
from .spaces import LayoutSpace, TextureSpace

GRID_COLUMNS = 8


def _load_tokenizer(config_name: str, weights: str, device: torch.device):
    from tokenizer.official import load_released

    if not config_name or not weights:
        raise ValueError("preview: texture and one-stage previews need preview.tokenizer and "
                         "preview.tokenizer_weights (set preview.every: 0 to disable previews)")
    return load_released(weights, config_name).to(device).eval()


class Preview:
    def __init__(self, config, space, shards: TokenShards, device: torch.device):
        self.config, self.space, self.shards, self.device = config, space, shards, device
        self.labels = (np.arange(config.num_images) % shards.plan.num_classes).tolist()
        self.indices = list(range(config.num_images))
        self.tokenizer = None if isinstance(space, LayoutSpace) else \
            _load_tokenizer(config.tokenizer, config.tokenizer_weights, device)

    def _grid(self, model: FlowTransformer) -> np.ndarray:
        cfg = self.config
        if isinstance(self.space, LayoutSpace):
            tile = self.shards.plan.tile_size
            source = ModelLayouts(model, self.space, cfg.sampler, cfg.seed, tile_size=self.shards.plan.tile_size,
                                  min_size=self.shards.plan.min_size)
            layouts = source.layouts(self.labels, self.indices).numpy()
            canvas = np.full((tile, tile, 3), 128, np.uint8)
            pictures = [draw_tokens(canvas, layout, scale=1) for layout in layouts]
        else:
            layouts = ShardLayouts(self.shards, cfg.seed) if isinstance(self.space, TextureSpace) else None
            generator = TokenGenerator(model, self.space, cfg.sampler, layouts, cfg.seed)
            tokens = generator.tokens(self.labels, self.indices)
            with torch.no_grad():
                images = to_uint8(self.tokenizer.decode(tokens.to(self.device)))
            pictures = list(images)
        rows = [pictures[i:i + GRID_COLUMNS] for i in range(0, len(pictures), GRID_COLUMNS)]
        if len(rows) > 1 and len(rows[-1]) < GRID_COLUMNS:
            rows[-1] = rows[-1] + [np.full_like(pictures[0], 255)] * (GRID_COLUMNS - len(rows[-1]))
        return image_grid(rows)

    def write(self, engine, model: FlowTransformer, step: int) -> None:
        """Draw the grid with the EMA weights of `model` (unwrapped; main process) as `images/samples_<step>.png`."""
        if not engine.is_main_process:
            return
        parameters = list(model.parameters())
        engine.ema.store(parameters)
        engine.ema.copy_to(parameters)
        was_training = model.training
        model.eval()
        try:
            grid = self._grid(model)
        finally:
            engine.ema.restore(parameters)
            model.train(was_training)
        engine.log_image(step, "samples", grid)

"""Loading the released SiT-XL-gs generator checkpoint, and the released tensor layout.

The released file is a safetensors state dict whose keys carry the prefix `ema_model.` (other prefixes hold
training state and are ignored). Its names follow SiT; ours match them except:
- `x_embedder.proj.weight` is a 1x1 convolution `(D, C, 1, 1)` there and a linear `(D, C)` here;
- `pos_embed` exists there but is never used when a layout condition is given (the released texture model
  always gets one), so it is checked and dropped unless the config asks for a positional embedding.
The released forward takes `(B, C, N, 1)` tensors and float-stored labels; `to_released_layout` and
`from_released_layout` convert between that and our `(B, N, C)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from .config import ModelConfig
from .models import FlowTransformer, build_model

RELEASED_PREFIX = "ema_model."


def released_config() -> ModelConfig:
    """The released texture model: SiT-XL, patch 1, 128 tokens of 21 channels, 1000 classes, 5-d layout."""
    return ModelConfig.sized("XL", num_tokens=128, in_channels=21, num_classes=1000, layout_channels=5)


def from_released_layout(x: torch.Tensor) -> torch.Tensor:
    """(B, C, N, 1) released tensor -> (B, N, C) tokens."""
    if x.dim() != 4 or x.shape[-1] != 1:
        raise ValueError(f"released tensors are (B, C, N, 1), got {tuple(x.shape)}")
    return x[..., 0].transpose(1, 2)


def to_released_layout(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, N, 1) released tensor."""
    if x.dim() != 3:
        raise ValueError(f"tokens are (B, N, C), got {tuple(x.shape)}")
    return x.transpose(1, 2).unsqueeze(-1)


def convert_released_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Released SiT-gs weights (prefix `ema_model.` or none) -> a state dict for `build_model(config)`.

    Strict: missing or unexpected keys and shape mismatches raise one error listing all of them."""
    if any(key.startswith(RELEASED_PREFIX) for key in state):
        state = {key[len(RELEASED_PREFIX):]: value for key, value in state.items() if key.startswith(RELEASED_PREFIX)}
    state = dict(state)
    weight = state.get("x_embedder.proj.weight")
    if weight is not None and weight.dim() == 4:
        state["x_embedder.proj.weight"] = weight.flatten(1)
    with torch.device("meta"):
        expected = {key: value.shape for key, value in build_model(config).state_dict().items()}
    if not config.pos_embed and "pos_embed" in state:
        if tuple(state["pos_embed"].shape) != (1, config.num_tokens, config.hidden_size):
            raise ValueError(f"released pos_embed has shape {tuple(state['pos_embed'].shape)}, config expects "
                             f"(1, {config.num_tokens}, {config.hidden_size})")
        del state["pos_embed"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key])}"
                   for key in set(expected) & set(state) if state[key].shape != expected[key])
    if missing or unexpected or wrong:
        raise ValueError("released generator does not match the config: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, shapes {wrong[:8]}")
    return state


def load_released_generator(path: str | Path, config: ModelConfig | None = None,
                            map_location: str | torch.device = "cpu") -> FlowTransformer:
    """The released generator file (safetensors, or a torch file read with `weights_only=True`) as an
    eval-mode model; `config` defaults to `released_config()`."""
    config = config or released_config()
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device=str(map_location))
    else:
        state = torch.load(path, map_location=map_location, weights_only=True)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        model = build_model(config)
    model.load_state_dict(convert_released_state_dict(state, config), assign=True)
    return model.eval()

"""Loading the released GPSToken checkpoints (S64 / M128 / L256) and configs of the released YAML format.

Files are read without unpickling: safetensors, or `torch.load(weights_only=True)`. The released key names
are translated to this suite's by `RELEASED_TO_NATIVE`, the one table of the mapping; the decoder's names are
the same on both sides, and checkpoints saved by this suite (native names) pass through unchanged.

What a checkpoint may hold besides the model, and how it is treated:
- `module.` / `_orig_mod.` prefixes (DDP, torch.compile) are stripped;
- `ema_model.`-prefixed copies: with `prefer_ema=True` (default) they are the weights loaded and the live
  weights are ignored; with `prefer_ema=False` the other way round;
- keys outside the model's namespaces (loss networks, discriminator, optimizer state, non-tensors) are ignored.
Inside the model's namespaces the match is strict: any model tensor missing, any unknown key and any
shape mismatch is a `CheckpointMismatchError` naming the first offending key (in model order) and both shapes.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import DecoderConfig, EncoderConfig, GPSTokenConfig, load_config
from .model import GPSToken

# (released key prefix as a regex, native prefix): the encoder's renaming; the first matching row wins.
RELEASED_TO_NATIVE: tuple[tuple[str, str], ...] = (
    (r"preprocess_img\.0\.", "encoder.stem.conv_in."),
    (r"preprocess_img\.([12])\.", r"encoder.stem.block\1."),
    (r"roialign_layer\.", "encoder.roi_proj."),
    (r"gps_embed\.weight$", "encoder.query"),
    (r"gps_embed_layer\.0\.", "encoder.geometry_embed.fc1."),
    (r"gps_embed_layer\.2\.", "encoder.geometry_embed.fc2."),
    (r"attnblocks\.(\d+)\.roimlp\.", r"encoder.blocks.\1.roi_pool."),
    (r"attnblocks\.(\d+)\.ln1\.", r"encoder.blocks.\1.norm1."),
    (r"attnblocks\.(\d+)\.attn1\.in_proj_", r"encoder.blocks.\1.attn.qkv."),
    (r"attnblocks\.(\d+)\.attn1\.out_proj\.", r"encoder.blocks.\1.attn.proj."),
    (r"attnblocks\.(\d+)\.ln2\.", r"encoder.blocks.\1.norm2."),
    (r"attnblocks\.(\d+)\.mlp\.0\.", r"encoder.blocks.\1.mlp.fc1."),
    (r"attnblocks\.(\d+)\.mlp\.2\.", r"encoder.blocks.\1.mlp.fc2."),
    (r"to_gps\.0\.", "encoder.geometry_head."),
    (r"to_gps\.1\.", "encoder.texture_head."),
    (r"decoder\.", "decoder."),
    (r"encoder\.", "encoder."),          # checkpoints saved by this suite
)
# Namespaces that belong to the model: a key starting with one of these must match a model tensor.
MODEL_NAMESPACES = ("preprocess_img.", "roialign_layer.", "gps_embed.", "gps_embed_layer.", "attnblocks.",
                    "to_gps.", "decoder.", "encoder.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_EMA_PREFIX = "ema_model."


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model built from the given config."""


def native_key(released_key: str) -> str | None:
    """The suite's name of a released (or native) state-dict key; None for keys outside the model."""
    for pattern, replacement in RELEASED_TO_NATIVE:
        match = re.match(pattern, released_key)
        if match:
            return match.expand(replacement) + released_key[match.end():]
    return None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A flat name -> tensor mapping from a safetensors or torch file, without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    for nested in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(nested), Mapping):
            loaded = loaded[nested]
            break
    if not isinstance(loaded, Mapping):
        raise CheckpointMismatchError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    return dict(loaded)


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def select_model_weights(checkpoint: Mapping[str, Any],
                         prefer_ema: bool = True) -> tuple[dict[str, Any], dict[str, str]]:
    """The model's tensors of a checkpoint under native names (prefixes stripped, EMA chosen, extras dropped),
    and the name each had in the checkpoint."""
    found: dict[bool, tuple[dict[str, Any], dict[str, str]]] = {True: ({}, {}), False: ({}, {})}
    for source, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = _strip_wrappers(source)
        is_ema = key.startswith(_EMA_PREFIX)
        key = _strip_wrappers(key[len(_EMA_PREFIX):]) if is_ema else key
        if not key.startswith(MODEL_NAMESPACES):
            continue
        name = native_key(key)
        if name is None:
            raise CheckpointMismatchError(f"checkpoint key '{source}' is in the model's namespace but matches "
                                          "no known GPSToken tensor")
        weights, sources = found[is_ema]
        if name in weights:
            raise CheckpointMismatchError(f"checkpoint keys '{sources[name]}' and '{source}' both give '{name}'")
        weights[name], sources[name] = value, source
    chosen, other = found[prefer_ema], found[not prefer_ema]
    return chosen if chosen[0] else other


def match_state_dict(model: torch.nn.Module, weights: Mapping[str, Any],
                     sources: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Check native-named `weights` against the model key for key and shape; return them in model order.

    Errors name the first offending key in model order, with its checkpoint name from `sources` if given.
    """
    def named(key: str) -> str:
        source = (sources or {}).get(key, key)
        return f"'{key}'" if source == key else f"'{source}' (model '{key}')"

    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in weights:
            raise CheckpointMismatchError(f"checkpoint lacks '{key}' {tuple(tensor.shape)} (and "
                                          f"{sum(k not in weights for k in expected) - 1} more missing)")
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise CheckpointMismatchError(f"checkpoint tensor {named(key)} has shape {tuple(weights[key].shape)} "
                                          f"but the model expects {tuple(tensor.shape)}: wrong config?")
    unexpected = [key for key in weights if key not in expected]
    if unexpected:
        raise CheckpointMismatchError(f"checkpoint has {len(unexpected)} tensor(s) the model lacks, first "
                                      f"{named(unexpected[0])} {tuple(weights[unexpected[0]].shape)}")
    return {key: weights[key] for key in expected}


def load_released(path: str | Path, config: GPSTokenConfig | str, *, prefer_ema: bool = True,
                  device: str | torch.device = "cpu") -> GPSToken:
    """Build the model of `config` (object, shipped name or YAML path) with the weights of a checkpoint file.

    Every model tensor must come from the checkpoint with its exact shape (see the module docstring for
    what else a file may hold). The model is returned in eval mode, float32, on `device`.
    """
    if not isinstance(config, GPSTokenConfig):
        config = load_config(config)
    weights, sources = select_model_weights(read_checkpoint(path), prefer_ema=prefer_ema)
    with torch.device("meta"):
        model = GPSToken(config)
    try:
        matched = match_state_dict(model, weights, sources)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{path} (config '{config.name}'): {error}") from None
    state = {key: value.to(device=device, dtype=torch.float32) for key, value in matched.items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


def config_from_released(gpsconfig: Mapping[str, Any], decoderconfig: Mapping[str, Any],
                         name: str = "released") -> GPSTokenConfig:
    """A `GPSTokenConfig` from the released YAML's `model.gpsconfig` / `model.decoderconfig` mappings."""
    render = list(gpsconfig["gps_rs"])
    unsupported = {
        "gps_rs must be square": render[0] != render[1],
        "decoder z_channels must equal gps_c": decoderconfig["z_channels"] != gpsconfig["gps_c"],
        "double_z must be false": bool(decoderconfig.get("double_z", False)),
        "attn_resolutions must be empty": list(decoderconfig.get("attn_resolutions", [])) != [],
        "in_channels must be 3": decoderconfig.get("in_channels", 3) != 3,
        "dropout must be 0": decoderconfig.get("dropout", 0.0) != 0.0,
    }
    problems = [what for what, bad in unsupported.items() if bad]
    if problems:
        raise ValueError(f"released config '{name}' is not supported: {'; '.join(problems)}")
    config = GPSTokenConfig(
        name=name,
        num_tokens=int(gpsconfig["gps_num"]),
        texture_channels=int(gpsconfig["gps_c"]),
        render_size=int(render[0]),
        dmax=float(gpsconfig["gps_dmax"]),
        partition_weight=float(gpsconfig["gps_adaptive_w"]),
        encoder=EncoderConfig(width=int(gpsconfig["gpsenc_c"]), depth=int(gpsconfig["gpsenc_n"]),
                              roi_size=int(gpsconfig["rois"])),
        decoder=DecoderConfig(channels=int(decoderconfig["ch"]), channel_mult=tuple(decoderconfig["ch_mult"]),
                              blocks_per_level=int(decoderconfig["num_res_blocks"]),
                              out_channels=int(decoderconfig.get("out_ch", 3))),
    )
    if "resolution" in decoderconfig and decoderconfig["resolution"] != config.tile_size:
        raise ValueError(f"released config '{name}': decoder resolution {decoderconfig['resolution']} does not "
                         f"match gps_rs {render[0]} upsampled {len(config.decoder.channel_mult) - 1} times")
    return config

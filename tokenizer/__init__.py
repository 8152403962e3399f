"""GPSToken tokenizer: typed configs, the encoder/decoder model, tiles, and the released-checkpoint loader."""
from .config import DecoderConfig, EncoderConfig, GPSTokenConfig, load_config
from .model import GPSToken, Tokenization
from .official import CheckpointMismatchError, config_from_released, load_released
from .tiles import join_tiles, merge_tile_tokens, split_tiles

__all__ = [
    "GPSToken", "Tokenization", "GPSTokenConfig", "EncoderConfig", "DecoderConfig",
    "load_config", "load_released", "config_from_released", "CheckpointMismatchError",
    "split_tiles", "join_tiles", "merge_tile_tokens",
]

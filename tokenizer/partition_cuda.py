"""The entropy partition (SPEC.md section 3) as one CUDA kernel launch per batch (issue 5).

`kernels/partition.cu` runs the whole greedy loop of a tile in one thread block, every tile of the batch at once,
with the tile's uint8 RGB pixels in shared memory: 3 * tile_size**2 bytes plus 14 bytes a region and 20 KB, which
for 256x256 tiles needs the shared memory per block of a Hopper GPU (227 KB). It is compiled at run time with NVRTC
and cached (`splat_cuda.nvrtc`).

Its arithmetic is the exact C kernel's (`_partition_kernel.c`), so the partitions are `tokenizer.partition`'s,
except where CUDA's pow differs from the C library's in the last bits and two regions' scores are that close.
`tokenizer.partition_torch.entropy_partition_torch` uses it for CUDA tensors when `supported` says so.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from splat_cuda import nvrtc
from tokenizer.partition import _ENTROPY_TERMS, SCORE_SIDE, _check_settings
from tokenizer.partition_torch import check_image_batch

SOURCE = Path(__file__).with_name("kernels") / "partition.cu"
KERNEL = "entropy_partition"

# Must match partition.cu: threads per block, and the largest tile (box corners are stored as bytes).
THREADS = 512
MAX_TILE_SIZE = 256
# The kernel's arithmetic is meant literally: no multiply-add contraction beyond its explicit fmaf calls.
OPTIONS = {"fma": False}
# Warp shuffles and __match_any_sync.
MIN_COMPUTE_CAPABILITY = (7, 0)


def shared_memory_bytes(tile_size: int, num_tokens: int) -> int:
    """Dynamic shared memory of one block: the layout `carve` makes in partition.cu."""
    doubles = num_tokens + 16 + 1  # region scores, the entropy's 16 partial sums, the score just computed
    # the resized region, its histogram, three colour tables, packed region boxes, the pick's reduction
    words = SCORE_SIDE * SCORE_SIDE + 256 + 3 * 256 + num_tokens + THREADS // 32 + 1
    shorts = num_tokens  # creation indices
    return 8 * doubles + 4 * words + 2 * shorts + 3 * tile_size * tile_size


def compile_kernel(arch: str, *, syntax_only: bool = False) -> bytes:
    """The kernel's cubin for `arch` (e.g. "sm_90"); needs NVRTC, not a GPU."""
    return nvrtc.compile_source(SOURCE.read_text(), arch, name="the partition kernel", options=OPTIONS,
                                syntax_only=syntax_only)


@lru_cache(maxsize=None)
def _cuda_python_available() -> bool:
    try:
        nvrtc.import_cuda_core()
    except ImportError:
        return False
    return True


@lru_cache(maxsize=None)
def _shared_memory_limit(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin


def _device_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def supported(device: torch.device, tile_size: int, num_tokens: int) -> bool:
    """Whether the kernel can partition tile_size tiles into num_tokens regions on a CUDA device: cuda-python is
    installed, tile_size <= 256, and one block's shared memory fits the device."""
    if not _cuda_python_available() or tile_size > MAX_TILE_SIZE:
        return False
    index = _device_index(device)
    return (torch.cuda.get_device_capability(index) >= MIN_COMPUTE_CAPABILITY
            and shared_memory_bytes(tile_size, num_tokens) <= _shared_memory_limit(index))


@lru_cache(maxsize=None)
def _kernel(device_index: int):
    """The loaded kernel on a device, allowed all the shared memory a block can have there."""
    arch = nvrtc.device_arch(device_index, MIN_COMPUTE_CAPABILITY, "the CUDA entropy partition")
    source = SOURCE.read_text()
    kernels = nvrtc.load_module(device_index, lambda: nvrtc.cached_cubin(source, arch, "partition", options=OPTIONS),
                                [KERNEL])
    nvrtc.allow_shared_memory(kernels[KERNEL], _shared_memory_limit(device_index), device_index)
    return kernels[KERNEL]


@lru_cache(maxsize=None)
def _entropy_terms(device_index: int) -> torch.Tensor:
    """numpy's entropy term of each bin count (tokenizer.partition._ENTROPY_TERMS), on a device."""
    return torch.from_numpy(_ENTROPY_TERMS).to(torch.device("cuda", device_index))


def partition_boxes(images: torch.Tensor, num_tokens: int, *, min_size: int = 8, weight: float = 2.5,
                    tile_size: int = 256) -> torch.Tensor:
    """Partition uint8 RGB images (B, H, W, 3) on a CUDA device; sides must be multiples of tile_size.

    Returns int64 (B * T, N, 4) boxes (y0, y1, x0, x1), inclusive tile-local pixel ranges, of the T tiles of each
    image (row-major) in token order. One kernel launch on PyTorch's current stream, no host synchronisation
    (after the first call on a device, which compiles or loads the kernel, the call can be captured in a CUDA graph).
    """
    _check_settings(num_tokens, min_size, weight, tile_size)
    check_image_batch(images, tile_size)
    if not images.is_cuda:
        raise ValueError(f"the CUDA partition needs images on a CUDA device, got {images.device}")
    nvrtc.import_cuda_core()  # a clear ImportError without cuda-python
    index = _device_index(images.device)
    needed, limit = shared_memory_bytes(tile_size, num_tokens), _shared_memory_limit(index)
    if tile_size > MAX_TILE_SIZE or needed > limit:
        raise ValueError(
            f"the CUDA partition handles tiles of at most {MAX_TILE_SIZE} pixels whose block fits in shared memory: "
            f"tile_size={tile_size} with {num_tokens} tokens needs {needed} bytes, the device allows {limit}"
        )
    batch, height, width = images.shape[:3]
    tiles = batch * (height // tile_size) * (width // tile_size)
    boxes = torch.empty(tiles, num_tokens, 4, dtype=torch.long, device=images.device)
    if tiles == 0:
        return boxes
    images = images.contiguous()
    with torch.cuda.device(index):
        nvrtc.launch(
            _kernel(index), index, (tiles, 1, 1), (THREADS, 1, 1), needed,
            images.data_ptr(), _entropy_terms(index).data_ptr(), boxes.data_ptr(), np.int32(height), np.int32(width),
            np.int32(tile_size), np.int32(num_tokens), np.int32(min_size), np.float64(weight),
        )
    return boxes

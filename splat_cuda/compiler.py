"""The splatting kernels' variants, compiled at run time with NVRTC and cached on disk (`splat_cuda.nvrtc`).

There is no build step at install: the first call on a GPU compiles the variant it needs
(`kernels/render.cu` plus one `SPLAT_INSTANTIATE(type, CPT)` line) for that GPU's own architecture,
and every later process loads it from the cache (see `splat_cuda.nvrtc` for the folder). Compilation
itself needs no GPU, which is how CPU-only CI checks that every variant compiles (`compile_variant`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from . import nvrtc
from .nvrtc import allow_shared_memory as _allow_shared_memory
from .nvrtc import cache_dir  # noqa: F401  (public here too)

KERNEL_SOURCE = Path(__file__).with_name("kernels") / "render.cu"

# Channel paddings the kernels are instantiated for (register accumulators per pixel).
CHANNEL_PADDINGS = (4, 8, 16, 32, 64)
MAX_CHANNELS = CHANNEL_PADDINGS[-1]

# Storage type of each supported token dtype, by the name used in the kernel source.
STORAGE_TYPES = {"float32": "float", "bfloat16": "bf16_t", "float16": "f16_t"}

# Must match the kernel source: 16x16 pixel tiles, 256 threads per block, a tile's token list built from at
# most THREADS 32-bit mask words.
TILE = 16
THREADS = 256
MAX_TOKENS = 32 * THREADS

# Blocks per SM the kernels are compiled to fit (forward, backward), by channel padding: measured on an H200
# (benchmarks/renderer.py --sweep-min-blocks). `SPLAT_CUDA_MIN_BLOCKS=F,B` overrides them, for tuning on
# other GPUs.
MIN_BLOCKS = {4: (4, 3), 8: (4, 3), 16: (4, 2), 32: (3, 3), 64: (2, 2)}

# The entry points of every variant (extern "C" in kernels/render.cu).
KERNEL_NAMES = ("render_forward", "render_backward", "render_backward_deterministic", "reduce_tile_gradients",
                "cast_gradient")

# Oldest architecture the kernels are written for (warp shuffles with masks, float atomics).
MIN_COMPUTE_CAPABILITY = (7, 0)


def channel_padding(channels: int) -> int:
    """Smallest instantiated channel padding that holds `channels` (1..MAX_CHANNELS)."""
    for cpt in CHANNEL_PADDINGS:
        if channels <= cpt:
            return cpt
    raise ValueError(f"the CUDA renderer handles at most {MAX_CHANNELS} channels, got {channels}")


def round_size(cpt: int) -> int:
    """Tokens culled per round into a forward block's shared list (ROUND_SIZE in render.cu)."""
    return 256 if cpt <= 32 else 128


def shared_memory_bytes(cpt: int, backward: bool) -> int:
    """Dynamic shared memory of one block: forward, a round's token geometry (32 bytes each) and features;
    backward, the tile's dL/dout (rows padded by 4 floats)."""
    if backward:
        return THREADS * (cpt + 4) * 4
    return round_size(cpt) * (32 + cpt * 4)


def min_blocks(cpt: int) -> tuple[int, int]:
    override = os.environ.get("SPLAT_CUDA_MIN_BLOCKS")
    if override:
        forward, backward = (int(v) for v in override.split(","))
        return forward, backward
    return MIN_BLOCKS[cpt]


def variant_source(dtype_name: str, cpt: int) -> str:
    if dtype_name not in STORAGE_TYPES:
        raise TypeError(f"the CUDA renderer supports {sorted(STORAGE_TYPES)} tokens, got {dtype_name}")
    if cpt not in CHANNEL_PADDINGS:
        raise ValueError(f"channel padding must be one of {CHANNEL_PADDINGS}, got {cpt}")
    forward_blocks, backward_blocks = min_blocks(cpt)
    return (f"#define FORWARD_MIN_BLOCKS {forward_blocks}\n#define BACKWARD_MIN_BLOCKS {backward_blocks}\n"
            + KERNEL_SOURCE.read_text() + f"\nSPLAT_INSTANTIATE({STORAGE_TYPES[dtype_name]}, {cpt})\n")


def compile_variant(dtype_name: str, cpt: int, arch: str, *, syntax_only: bool = False) -> bytes:
    """Compile one kernel variant to a cubin for `arch` (e.g. "sm_90"); needs NVRTC, not a GPU.

    With `syntax_only`, NVRTC only parses and instantiates the templates (fast; no code).
    """
    return nvrtc.compile_source(variant_source(dtype_name, cpt), arch, name=f"splat_cuda {dtype_name}/c{cpt}",
                                syntax_only=syntax_only)


def cached_cubin(dtype_name: str, cpt: int, arch: str) -> bytes:
    """The cubin of a variant, from the disk cache or compiled (and then stored) on a miss."""
    return nvrtc.cached_cubin(variant_source(dtype_name, cpt), arch, f"render_{dtype_name}_c{cpt}",
                              build=lambda: compile_variant(dtype_name, cpt, arch))


@dataclass(frozen=True)
class KernelSet:
    """The loaded kernels of one (device, dtype, channel padding) variant."""

    forward: object
    backward: object
    backward_deterministic: object
    reduce_tile_gradients: object
    cast_gradient: object
    cpt: int


def device_arch(device_index: int) -> str:
    return nvrtc.device_arch(device_index, MIN_COMPUTE_CAPABILITY, "splat_cuda")


@lru_cache(maxsize=None)
def load_kernels(device_index: int, dtype_name: str, cpt: int) -> KernelSet:
    """Compile (or fetch from the cache) and load one variant on a device."""
    kernels = nvrtc.load_module(device_index, lambda: cached_cubin(dtype_name, cpt, device_arch(device_index)),
                                KERNEL_NAMES)
    for name, backward in (("render_forward", False), ("render_backward", True),
                           ("render_backward_deterministic", True)):
        _allow_shared_memory(kernels[name], shared_memory_bytes(cpt, backward), device_index)
    return KernelSet(
        forward=kernels["render_forward"],
        backward=kernels["render_backward"],
        backward_deterministic=kernels["render_backward_deterministic"],
        reduce_tile_gradients=kernels["reduce_tile_gradients"],
        cast_gradient=kernels["cast_gradient"],
        cpt=cpt,
    )

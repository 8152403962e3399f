"""Run-time compilation of the splatting kernels with NVRTC, cached on disk.

There is no build step at install: the first call on a GPU compiles the variant it needs
(`kernels/render.cu` plus one `SPLAT_INSTANTIATE(type, CPT)` line) for that GPU's own architecture,
stores the cubin under the cache folder keyed by a hash of (source, options, architecture, NVRTC
version), and every later process loads it from there. Compilation itself needs no GPU, which is
how CPU-only CI checks that every variant compiles (`compile_variant`).

Cache folder: `$SPLAT_CUDA_CACHE`, else `$XDG_CACHE_HOME/gpstoken/splat_cuda`, else
`~/.cache/gpstoken/splat_cuda`.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

KERNEL_SOURCE = Path(__file__).with_name("kernels") / "render.cu"

# Channel paddings the kernels are instantiated for (register accumulators per pixel).
CHANNEL_PADDINGS = (4, 8, 16, 32, 64)
MAX_CHANNELS = CHANNEL_PADDINGS[-1]

# Storage type of each supported token dtype, by the name used in the kernel source.
STORAGE_TYPES = {"float32": "float", "bfloat16": "bf16_t", "float16": "f16_t"}

# Must match the kernel source: 16x16 pixel tiles, 256 threads per block, a tile's token list built from at
# most THREADS 32-bit mask words, a `prep` row of 8 geometry floats before the padded features.
TILE = 16
THREADS = 256
MAX_TOKENS = 32 * THREADS
GEO_FLOATS = 8

# Blocks per SM the kernels are compiled to fit (forward, backward), by channel padding: measured on an H200
# (benchmarks/renderer.py --sweep-min-blocks). `SPLAT_CUDA_MIN_BLOCKS=F,B` overrides them, for tuning on
# other GPUs.
MIN_BLOCKS = {4: (4, 3), 8: (4, 3), 16: (4, 3), 32: (3, 3), 64: (2, 2)}

# Oldest architecture the kernels are written for (warp shuffles with masks, float atomics).
MIN_COMPUTE_CAPABILITY = (7, 0)


def _import_cuda_core():
    try:
        import cuda.core as core
        if not hasattr(core, "Program"):
            import cuda.core.experimental as core  # cuda.core < 1.0
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "splat_cuda's GPU renderer needs cuda-python (packages cuda-core and cuda-bindings, "
            "the project's `cuda` extra); CPU tensors do not need it"
        ) from err
    return core


def channel_padding(channels: int) -> int:
    """Smallest instantiated channel padding that holds `channels` (1..MAX_CHANNELS)."""
    for cpt in CHANNEL_PADDINGS:
        if channels <= cpt:
            return cpt
    raise ValueError(f"the CUDA renderer handles at most {MAX_CHANNELS} channels, got {channels}")


def shared_memory_bytes(cpt: int) -> int:
    """Dynamic shared memory of one backward block: the tile's dL/dout, rows padded by 4 floats."""
    return THREADS * (cpt + 4) * 4


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


def _options(core, arch: str, syntax_only: bool = False):
    return core.ProgramOptions(arch=arch, std="c++17", fdevice_syntax_only=True if syntax_only else None)


def _nvrtc_version() -> str:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    return f"{major}.{minor}"


def cache_dir() -> Path:
    env = os.environ.get("SPLAT_CUDA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpstoken" / "splat_cuda"


def compile_variant(dtype_name: str, cpt: int, arch: str, *, syntax_only: bool = False) -> bytes:
    """Compile one kernel variant to a cubin for `arch` (e.g. "sm_90"); needs NVRTC, not a GPU.

    With `syntax_only`, NVRTC only parses and instantiates the templates (fast; no code).
    """
    core = _import_cuda_core()
    source = variant_source(dtype_name, cpt)
    options = _options(core, arch, syntax_only)
    try:
        code = core.Program(source, "c++", options).compile("cubin")
    except Exception as err:
        raise RuntimeError(f"NVRTC failed to compile splat_cuda {dtype_name}/c{cpt} for {arch}: {err}") from err
    return bytes(code.code) if not syntax_only else b""


def cached_cubin(dtype_name: str, cpt: int, arch: str) -> bytes:
    """The cubin of a variant, from the disk cache or compiled (and then stored) on a miss."""
    core = _import_cuda_core()
    source = variant_source(dtype_name, cpt)
    key_text = "\n".join([source, repr(_options(core, arch)), arch, _nvrtc_version()])
    key = hashlib.sha256(key_text.encode()).hexdigest()
    folder = cache_dir()
    path = folder / f"render_{dtype_name}_c{cpt}_{arch}_{key[:24]}.cubin"
    if path.is_file():
        return path.read_bytes()
    cubin = compile_variant(dtype_name, cpt, arch)
    folder.mkdir(parents=True, exist_ok=True)
    # write-then-rename, so a concurrent reader never sees half a file
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(cubin)
    os.replace(tmp, path)
    return cubin


@dataclass(frozen=True)
class KernelSet:
    """The loaded kernels of one (device, dtype, channel padding) variant."""

    prepare: object
    forward: object
    backward: object
    backward_deterministic: object
    reduce_tile_gradients: object
    cpt: int


_load_lock = threading.Lock()


def device_arch(device_index: int) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) < MIN_COMPUTE_CAPABILITY:
        name = torch.cuda.get_device_name(device_index)
        raise RuntimeError(
            f"splat_cuda needs a GPU of compute capability >= {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]}, "
            f"{name} has {major}.{minor}"
        )
    return f"sm_{major}{minor}"


def _allow_shared_memory(kernel, nbytes: int, device_index: int) -> None:
    """Allow a kernel `nbytes` of dynamic shared memory (beyond 48 KB needs this opt-in).

    The L1/shared carveout is left to the driver: forcing the largest shared-memory carveout
    measured slower at N = 4096, where the per-round token reads hit L1.
    """
    from cuda.bindings import driver

    attribute = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    handle = kernel.handle
    if isinstance(handle, driver.CUkernel):  # library-loaded kernel (cuda.core >= 0.3)
        (err,) = driver.cuKernelSetAttribute(attribute, nbytes, handle, driver.CUdevice(device_index))
    else:
        (err,) = driver.cuFuncSetAttribute(handle, attribute, nbytes)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"splat_cuda: cannot grant {nbytes} bytes of shared memory to a kernel ({err})")


@lru_cache(maxsize=None)
def load_kernels(device_index: int, dtype_name: str, cpt: int) -> KernelSet:
    """Compile (or fetch from the cache) and load one variant on a device."""
    core = _import_cuda_core()
    with _load_lock:
        device = core.Device(device_index)
        device.set_current()
        cubin = cached_cubin(dtype_name, cpt, device_arch(device_index))
        module = core.ObjectCode.from_cubin(cubin)
        names = ("render_prepare", "render_forward", "render_backward", "render_backward_deterministic",
                 "reduce_tile_gradients")
        kernels = {name: module.get_kernel(name) for name in names}
        for name in ("render_backward", "render_backward_deterministic"):
            _allow_shared_memory(kernels[name], shared_memory_bytes(cpt), device_index)
        return KernelSet(
            prepare=kernels["render_prepare"],
            forward=kernels["render_forward"],
            backward=kernels["render_backward"],
            backward_deterministic=kernels["render_backward_deterministic"],
            reduce_tile_gradients=kernels["reduce_tile_gradients"],
            cpt=cpt,
        )

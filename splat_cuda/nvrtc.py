"""Run-time compilation of CUDA C++ with NVRTC (through cuda.core), cached on disk; loading and launching kernels.

The generic machinery behind every CUDA kernel of the project: the renderer (`splat_cuda/compiler.py`) and the
entropy partition (`tokenizer/partition_cuda.py`). There is no build step at install: the first process that
needs a kernel compiles it for its GPU's own architecture and stores the cubin in the cache folder under a name
keyed by a hash of (source, compiler options, architecture, NVRTC version); later processes load it from there.
A cubin is written to a temporary file and renamed into place, so a concurrent reader never sees half a file.
Compilation itself needs no GPU, which is how CPU-only CI checks that the kernels compile.

Cache folder: `$SPLAT_CUDA_CACHE`, else `$XDG_CACHE_HOME/gpstoken/splat_cuda`, else `~/.cache/gpstoken/splat_cuda`.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from pathlib import Path


def import_cuda_core():
    """The cuda.core module; an ImportError that says what to install when it is missing."""
    try:
        import cuda.core as core
        if not hasattr(core, "Program"):
            import cuda.core.experimental as core  # cuda.core < 1.0
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the CUDA kernels need cuda-python (packages cuda-core and cuda-bindings, the project's `cuda` "
            "extra); CPU tensors do not need it"
        ) from err
    return core


def nvrtc_version() -> str:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    return f"{major}.{minor}"


def cache_dir() -> Path:
    env = os.environ.get("SPLAT_CUDA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpstoken" / "splat_cuda"


def compile_source(source: str, arch: str, *, name: str, options: Mapping | None = None,
                   syntax_only: bool = False) -> bytes:
    """Compile CUDA C++17 `source` to a cubin for `arch` (e.g. "sm_90"); needs NVRTC, not a GPU.

    name: what is compiled, for the error message. options: further `cuda.core.ProgramOptions` fields (e.g.
    `{"fma": False}`). With `syntax_only`, NVRTC only parses and instantiates templates (fast; returns b"").
    """
    core = import_cuda_core()
    program_options = core.ProgramOptions(arch=arch, std="c++17", fdevice_syntax_only=True if syntax_only else None,
                                          **dict(options or {}))
    try:
        code = core.Program(source, "c++", program_options).compile("cubin")
    except Exception as err:
        raise RuntimeError(f"NVRTC failed to compile {name} for {arch}: {err}") from err
    return bytes(code.code) if not syntax_only else b""


def cached_cubin(source: str, arch: str, name: str, *, options: Mapping | None = None,
                 build: Callable[[], bytes] | None = None) -> bytes:
    """The cubin of `source` for `arch`, from the disk cache, or compiled (and then stored) on a miss.

    name: the cache file's prefix. build: makes the cubin on a miss; by default
    `compile_source(source, arch, name=name, options=options)`.
    """
    options = dict(options or {})
    key_text = "\n".join([source, repr(sorted(options.items())), arch, nvrtc_version()])
    key = hashlib.sha256(key_text.encode()).hexdigest()
    folder = cache_dir()
    path = folder / f"{name}_{arch}_{key[:24]}.cubin"
    if path.is_file():
        return path.read_bytes()
    cubin = build() if build is not None else compile_source(source, arch, name=name, options=options)
    folder.mkdir(parents=True, exist_ok=True)
    # write-then-rename, so a concurrent reader never sees half a file
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(cubin)
    os.replace(tmp, path)
    return cubin


def device_arch(device_index: int, minimum: tuple[int, int], user: str) -> str:
    """The architecture ("sm_90") of a CUDA device; a RuntimeError naming `user` when it is older than `minimum`."""
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) < minimum:
        name = torch.cuda.get_device_name(device_index)
        raise RuntimeError(
            f"{user} needs a GPU of compute capability >= {minimum[0]}.{minimum[1]}, {name} has {major}.{minor}"
        )
    return f"sm_{major}{minor}"


_load_lock = threading.Lock()


def load_module(device_index: int, cubin: Callable[[], bytes], kernel_names: Iterable[str]) -> dict:
    """Load the cubin that `cubin()` returns (compiled or from the cache) on a device; its kernels by name.

    One thread at a time: the device's primary context is made current on the calling thread first.
    """
    core = import_cuda_core()
    with _load_lock:
        core.Device(device_index).set_current()
        module = core.ObjectCode.from_cubin(cubin())
        return {name: module.get_kernel(name) for name in kernel_names}


def allow_shared_memory(kernel, nbytes: int, device_index: int) -> None:
    """Allow a kernel `nbytes` of dynamic shared memory (beyond 48 KB needs this opt-in).

    The L1/shared carveout is left to the driver: forcing the largest shared-memory carveout measured slower for
    the renderer at N = 4096, where the per-round token reads hit L1.
    """
    from cuda.bindings import driver

    attribute = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    handle = kernel.handle
    if isinstance(handle, driver.CUkernel):  # library-loaded kernel (cuda.core >= 0.3)
        (err,) = driver.cuKernelSetAttribute(attribute, nbytes, handle, driver.CUdevice(device_index))
    else:
        (err,) = driver.cuFuncSetAttribute(handle, attribute, nbytes)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cannot grant {nbytes} bytes of shared memory to a CUDA kernel ({err})")


_thread = threading.local()


def launch(kernel, device_index: int, grid: tuple[int, int, int], block: tuple[int, int, int], shmem: int,
           *args, dependent: bool = False) -> None:
    """Launch a kernel on PyTorch's current stream of a device, without synchronising with the host.

    args are packed by type: pass `np.int32`/`np.float32`/`np.float64` for C scalars and `tensor.data_ptr()` for
    pointers. cuda.core wants the device's context current on the calling thread (autograd runs backward passes
    on threads of its own), so each thread makes it current once per device.
    dependent: launch as a programmatic dependent of the stream's previous kernel (compute capability >= 9.0;
    ignored before): the kernel may start while that one finishes, so it must execute `griddepcontrol.wait`
    before it touches global memory.
    """
    import torch

    core = import_cuda_core()
    ready = _thread.__dict__.setdefault("devices", set())
    if device_index not in ready:
        core.Device(device_index).set_current()
        ready.add(device_index)
    stream = core.Stream.from_handle(torch.cuda.current_stream(device_index).cuda_stream)
    options = {"programmatic_stream_serialization": True} if dependent and _dependent_launches(device_index) else {}
    core.launch(stream, core.LaunchConfig(grid=grid, block=block, shmem_size=shmem, **options), kernel, *args)


@lru_cache(maxsize=None)
def _dependent_launches(device_index: int) -> bool:
    """Whether programmatic dependent launches are available: a device of compute capability >= 9.0 and a
    cuda.core whose LaunchConfig takes them."""
    import torch

    try:
        import_cuda_core().LaunchConfig(grid=1, block=1, programmatic_stream_serialization=True)
    except TypeError:
        return False
    return torch.cuda.get_device_capability(device_index) >= (9, 0)

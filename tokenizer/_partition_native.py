"""Run-time build of the partition's pixel kernel (`_partition_kernel.c`) with the system C compiler.

There is no build step at install: the first process that needs the kernel compiles it with `$CC`, else `cc`,
`gcc` or `clang`, and stores the shared library in a cache folder under a name keyed by a hash of the source, the
flags, the compiler's version text and the platform; later processes load it from there. The library is
written to a temporary file and renamed into place, so parallel processes (data-loader workers) never load a
half-written file; at worst two of them compile it at once.

Cache folder: `$GPSTOKEN_CACHE/partition`, else `$XDG_CACHE_HOME/gpstoken/partition`, else
`~/.cache/gpstoken/partition`. Set `GPSTOKEN_PARTITION_KERNEL=0` to never use the kernel.

`load()` returns None, with one warning per process, when the kernel cannot be built or loaded; the partition
then uses its OpenCV/numpy path, which gives the same results more slowly.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).with_name("_partition_kernel.c")
# -ffp-contract=off: the kernel's arithmetic must be exactly the one written (no fused multiply-adds but
# its explicit fmaf calls). -fno-math-errno lets sqrt vectorise; it changes no value.
FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")

_ADDRESS = ctypes.c_void_p  # arrays are passed as their data addresses (numpy's `array.ctypes.data`)


def cache_dir() -> Path:
    env = os.environ.get("GPSTOKEN_CACHE")
    if env:
        return Path(env) / "partition"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpstoken" / "partition"


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise RuntimeError("no C compiler found (set CC, or install cc/gcc/clang)")


def build() -> Path:
    """Path of the compiled kernel library, compiling it into the cache folder unless it is there already."""
    compiler = _compiler()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(FLAGS), compiler, version, platform.platform(), platform.machine()])
        .encode()
    ).hexdigest()[:20]
    suffix = sysconfig.get_config_var("SHLIB_SUFFIX") or ".so"
    folder = cache_dir()
    target = folder / f"partition_kernel-{key}{suffix}"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", temporary, "-lm"], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}:\n{result.stderr.strip()}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


class Kernel:
    """The kernel's entry points, with their C signatures (see `_partition_kernel.c`); arrays by address."""

    def __init__(self, path: Path):
        library = ctypes.CDLL(str(path))
        self.region_scores = library.gps_region_scores
        self.region_scores.argtypes = [ctypes.c_int, *[_ADDRESS] * 4, ctypes.c_double, _ADDRESS, _ADDRESS]
        self.region_scores.restype = ctypes.c_int
        self.unit_image = library.gps_unit_image
        self.unit_image.argtypes = [_ADDRESS, ctypes.c_int64, _ADDRESS, _ADDRESS]
        self.unit_image.restype = None
        self.resize64 = library.gps_resize64
        self.resize64.argtypes = [_ADDRESS, ctypes.c_int64, ctypes.c_int, ctypes.c_int, _ADDRESS]
        self.resize64.restype = None


@lru_cache(maxsize=None)
def load() -> Kernel | None:
    """The compiled kernel, or None (warning once) when it is switched off or cannot be built or loaded."""
    if os.environ.get("GPSTOKEN_PARTITION_KERNEL", "1") == "0":
        return None
    try:
        return Kernel(build())
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"tokenizer.partition: the compiled region kernel is unavailable ({error}); using the slower "
            "OpenCV/numpy path, which gives the same partitions",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


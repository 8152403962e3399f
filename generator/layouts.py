"""Where the layouts (per-token init geometry) of generated images come from.

A `LayoutSource` maps (label, global sample index) to an N x 5 layout, deterministically, so the texture
sampler's output does not depend on batching or on the number of processes. Sources:
- `InitgLayouts`: the released `initg.pickle` (class id -> list of (128, >= 5) float arrays), read with a
  restricted unpickler that builds only dicts, lists, tuples, numbers, strings and numpy arrays and refuses
  any other global (the file is a Python pickle: loading it with `pickle.load` could run arbitrary code);
- the layout model and real-layout shards plug in through the same protocol.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

GEOMETRY_DIM = 5

# The only globals an array pickle needs (numpy 1.x and 2.x module names; `_codecs.encode` carries the
# bytes of protocol-2 pickles).
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
      for name in ("_reconstruct", "scalar")),
    *((module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler of plain containers and numpy arrays only; any other global is refused with an error."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load '{module}.{name}': only dicts, lists, tuples and "
                                         "numpy arrays are accepted in a layout file")
        return super().find_class(module, name)


def restricted_load(data: bytes | io.BufferedIOBase) -> Any:
    """Unpickle bytes or a binary file with `RestrictedUnpickler`."""
    handle = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    return RestrictedUnpickler(handle).load()


def load_initg(path: str | Path) -> dict[int, list[np.ndarray]]:
    """The released `initg.pickle` as {class id: [float32 (N, 5) layouts]}, validated (see `validate_bank`)."""
    with open(path, "rb") as handle:
        data = restricted_load(handle)
    return validate_bank(data, where=str(path))


def validate_bank(data: Any, where: str = "layout bank") -> dict[int, list[np.ndarray]]:
    """Check a {class id: list of (N, >= 5) real arrays} mapping (one N for all, finite, sigma > 0) and
    return it with int keys and float32 (N, 5) arrays."""
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{where}: expected a non-empty dict class id -> list of arrays, got {type(data).__name__}")
    bank: dict[int, list[np.ndarray]] = {}
    num_tokens = None
    for key, rows in data.items():
        if not isinstance(key, (int, np.integer)) or isinstance(key, bool) or key < 0:
            raise ValueError(f"{where}: class ids must be non-negative integers, got {key!r}")
        if not isinstance(rows, (list, tuple)) or not rows:
            raise ValueError(f"{where}: class {key}: expected a non-empty list of arrays, got {type(rows).__name__}")
        layouts = []
        for i, row in enumerate(rows):
            if not isinstance(row, np.ndarray) or row.dtype.kind not in "fiu" or row.ndim != 2 \
                    or row.shape[1] < GEOMETRY_DIM:
                raise ValueError(f"{where}: class {key} item {i}: expected a real (N, >= 5) array, got "
                                 f"{getattr(row, 'dtype', type(row).__name__)} {getattr(row, 'shape', '')}")
            num_tokens = row.shape[0] if num_tokens is None else num_tokens
            if row.shape[0] != num_tokens:
                raise ValueError(f"{where}: class {key} item {i} has {row.shape[0]} tokens, others {num_tokens}")
            layout = np.ascontiguousarray(row[:, :GEOMETRY_DIM], dtype=np.float32)
            if not np.isfinite(layout).all() or (layout[:, :2] <= 0).any():
                raise ValueError(f"{where}: class {key} item {i}: non-finite values or sigma <= 0")
            layouts.append(layout)
        bank[int(key)] = layouts
    return bank


@runtime_checkable
class LayoutSource(Protocol):
    """Layouts for generated images: the same (label, sample id) always gives the same layout."""

    num_tokens: int

    def layouts(self, labels: Sequence[int], sample_ids: Sequence[int]) -> torch.Tensor:
        """(B, num_tokens, 5) float32 layouts for the given labels and global sample indices."""
        ...


class InitgLayouts:
    """Layouts from a bank of stored init geometries (the released `initg.pickle`).

    Sample `i` is taken to be occurrence `k = i // class_count` of its class (the released sampler labels
    sample i with class `i % class_count`) and receives item `len - 1 - k` of the class list: the order in
    which the released code `pop()`s them, made independent of batching. With `cycle`, k wraps around the
    list; without, running out of layouts is an error.
    """

    def __init__(self, bank: Mapping[int, Sequence[np.ndarray]], class_count: int | None = None,
                 cycle: bool = False):
        self.bank = validate_bank(dict(bank))
        self.class_count = class_count if class_count is not None else len(self.bank)
        self.cycle = cycle
        self.num_tokens = next(iter(self.bank.values()))[0].shape[0]

    @classmethod
    def from_pickle(cls, path: str | Path, class_count: int | None = None, cycle: bool = False) -> "InitgLayouts":
        return cls(load_initg(path), class_count, cycle)

    def layouts(self, labels: Sequence[int], sample_ids: Sequence[int]) -> torch.Tensor:
        labels, sample_ids = [int(y) for y in labels], [int(i) for i in sample_ids]
        if len(labels) != len(sample_ids):
            raise ValueError(f"{len(labels)} labels for {len(sample_ids)} sample ids")
        rows = []
        for label, index in zip(labels, sample_ids):
            if label not in self.bank:
                raise ValueError(f"no layouts for class {label} (the bank holds classes "
                                 f"{min(self.bank)}..{max(self.bank)}, {len(self.bank)} in all)")
            items = self.bank[label]
            occurrence = index // self.class_count
            if occurrence >= len(items) and not self.cycle:
                raise ValueError(f"class {label} has {len(items)} layouts; sample {index} needs number "
                                 f"{occurrence + 1} (pass cycle=True to reuse them)")
            rows.append(items[len(items) - 1 - occurrence % len(items)])
        return torch.from_numpy(np.stack(rows))

"""Layout sources: the restricted reader of `initg.pickle` and the deterministic per-sample assignment."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from generator.layouts import InitgLayouts, LayoutSource, load_initg, restricted_load


def make_bank(classes=3, per_class=4, tokens=128, width=6, seed=0):
    rng = np.random.default_rng(seed)
    bank = {}
    for c in range(classes):
        rows = []
        for _ in range(per_class):
            row = rng.uniform(-1, 1, (tokens, width)).astype(np.float64)
            row[:, :2] = rng.uniform(0.01, 0.3, (tokens, 2))
            rows.append(row)
        bank[c] = rows
    return bank


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reads_released_style_pickles(tmp_path, protocol):
    bank = make_bank()
    bank[np.int64(7)] = bank.pop(2)  # numpy integer keys are accepted too
    path = tmp_path / "initg.pickle"
    path.write_bytes(pickle.dumps(bank, protocol=protocol))
    loaded = load_initg(path)
    assert sorted(loaded) == [0, 1, 7] and all(type(k) is int for k in loaded)
    for key, rows in bank.items():
        assert len(loaded[int(key)]) == len(rows)
        for ours, theirs in zip(loaded[int(key)], rows):
            assert ours.dtype == np.float32 and ours.shape == (128, 5)
            assert np.array_equal(ours, theirs[:, :5].astype(np.float32))


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_refuses_everything_but_containers_and_arrays(tmp_path):
    target = tmp_path / "pwned"
    payloads = {
        "builtins.open": {0: [Exploit(str(target))]},
        "posix.system": {0: [type("X", (), {"__reduce__": lambda self: (os.system, ("true",))})()]},
        "builtins.set": {0: {1, 2}},  # protocol 2 needs a global for sets
        "torch": {0: [torch.zeros(128, 5)]},
        "builtins.slice": {0: [slice(1, 2)]},
    }
    for name, payload in payloads.items():
        with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
            restricted_load(pickle.dumps(payload, protocol=2))
    assert not target.exists()


def test_rejects_malformed_banks(tmp_path):
    good = make_bank(classes=1, per_class=2)
    bad_cases = {
        "non-empty dict": [],
        "class ids must be": {"a": good[0]},
        "non-empty list": {0: []},
        "got set": {0: {1, 2}},  # protocol 4 builds sets without a global: caught by the validation
        r"real \(N, >= 5\) array": {0: [np.zeros((128, 4))]},
        "object": {0: [np.array([[None] * 5] * 128, dtype=object)]},
        "has 64 tokens": {0: [good[0][0], good[0][0][:64]]},
        "non-finite": {0: [np.full((128, 5), np.nan)]},
        "sigma <= 0": {0: [np.zeros((128, 5))]},
    }
    for message, data in bad_cases.items():
        path = tmp_path / "bad.pickle"
        path.write_bytes(pickle.dumps(data))
        with pytest.raises(ValueError, match=message):
            load_initg(path)


def test_assignment_is_deterministic_and_follows_pop_order():
    bank = make_bank(classes=3, per_class=4)
    source = InitgLayouts(bank)
    assert isinstance(source, LayoutSource) and source.num_tokens == 128 and source.class_count == 3
    ids = list(range(12))  # the released sampler: sample i has class i % class_count
    labels = [i % 3 for i in ids]
    whole = source.layouts(labels, ids)
    assert whole.shape == (12, 128, 5) and whole.dtype == torch.float32
    for i in ids:  # occurrence k = i // 3 of its class receives item len - 1 - k, as pop() would hand out
        expected = bank[i % 3][3 - i // 3][:, :5].astype(np.float32)
        assert np.array_equal(whole[i].numpy(), expected)
        assert torch.equal(source.layouts([labels[i]], [i])[0], whole[i])  # any batching, same layout
    assert len({tuple(whole[i].flatten()[:3].tolist()) for i in ids}) == 12  # every stored layout used once
    with pytest.raises(ValueError, match="class 1 has 4 layouts; sample 13 needs number 5"):
        source.layouts([1], [13])
    assert torch.equal(InitgLayouts(bank, cycle=True).layouts([1], [13])[0], whole[1])
    with pytest.raises(ValueError, match="no layouts for class 9"):
        source.layouts([9], [0])

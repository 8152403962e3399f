"""Shared test fixtures: where the released-code fixtures live, and GPU skipping."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _official_dir() -> Path:
    env = os.environ.get("GPSTOKEN_FIXTURES")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "fixtures" / "official"


@pytest.fixture(scope="session")
def official_dir() -> Path:
    """Folder of tensors produced by the released GPSToken code (../shared/fixtures/official)."""
    path = _official_dir()
    if not path.is_dir():
        pytest.fail(f"fixtures of the released code not found at {path}; set GPSTOKEN_FIXTURES")
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

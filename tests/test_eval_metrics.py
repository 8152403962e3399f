"""The metric mathematics against scipy, torch-fidelity's own functions and scikit-image (no network needed)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from eval.metrics import (feature_statistics, frechet_distance, inception_score, kernel_inception_distance,
                          precision_recall, psnr, sqrtm_psd, ssim)

fidelity_fid = pytest.importorskip("torch_fidelity.metric_fid")
fidelity_isc = pytest.importorskip("torch_fidelity.metric_isc")
fidelity_kid = pytest.importorskip("torch_fidelity.metric_kid")
fidelity_prc = pytest.importorskip("torch_fidelity.metric_prc")


@pytest.fixture
def two_feature_sets():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(32, 32)) / 6
    real = rng.normal(size=(120, 32)) @ mixing
    generated = rng.normal(size=(100, 32)) @ (mixing * 1.2) + 0.3
    return real, generated


def test_sqrtm_matches_scipy_on_well_conditioned_matrices():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 40))
    spd = a @ a.T + 0.5 * np.eye(40)
    root = sqrtm_psd(spd)
    np.testing.assert_allclose(root, scipy.linalg.sqrtm(spd).real, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(root @ root, spd, rtol=1e-9, atol=1e-9)


def test_sqrtm_and_fid_stay_finite_and_real_on_singular_covariances():
    rng = np.random.default_rng(2)
    # 5 samples in 64 dimensions: rank-4 covariances, eigenvalues around zero of either sign
    mu1, sigma1 = feature_statistics(rng.normal(size=(5, 64)))
    mu2, sigma2 = feature_statistics(rng.normal(size=(5, 64)) + 1)
    root = sqrtm_psd(sigma1)
    assert np.isrealobj(root) and np.isfinite(root).all()
    np.testing.assert_allclose(root @ root, sigma1, atol=1e-10)
    value = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(value) and value > 0
    # sqrt of round-off eigenvalues (~1e-12) contributes ~1e-6 each: small against the trace (~60)
    assert abs(frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-4


def test_frechet_distance_matches_torch_fidelity_and_scipy(two_feature_sets):
    real, generated = two_feature_sets
    mu1, sigma1 = feature_statistics(generated)
    mu2, sigma2 = feature_statistics(real)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    reference = fidelity_fid.fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2},
                                                      verbose=False)["frechet_inception_distance"]
    diff = mu1 - mu2
    with_scipy = diff @ diff + np.trace(sigma1 + sigma2) - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2).real)
    assert ours == pytest.approx(reference, rel=1e-9)
    assert ours == pytest.approx(with_scipy, rel=1e-7)
    assert ours > 0.1  # the sets differ: a distance that is always ~0 would also "match"


def test_statistics_are_float64_unbiased(two_feature_sets):
    real, _ = two_feature_sets
    single = real.astype(np.float32)
    mu, sigma = feature_statistics(single)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(single.astype(np.float64), rowvar=False), rtol=1e-12, atol=1e-15)
    centred = single.astype(np.float64) - single.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(real) - 1), rtol=1e-10, atol=1e-14)


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="dimension 4"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_statistics(np.zeros((1, 4)))


def test_inception_score_matches_torch_fidelity_without_shuffling():
    logits = np.random.default_rng(3).normal(size=(53, 1008)) * 4
    mean, std = inception_score(logits, splits=10)
    reference = fidelity_isc.isc_features_to_metric(torch.tensor(logits), splits=10, shuffle=False)
    assert mean == pytest.approx(reference["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(reference["inception_score_std"], rel=1e-9)
    assert mean > 1.5


def test_kid_matches_torch_fidelity(two_feature_sets):
    real, generated = two_feature_sets
    mean, std = kernel_inception_distance(generated, real, subsets=20, subset_size=50, seed=2020)
    reference = fidelity_kid.kid_features_to_metric(torch.tensor(generated), torch.tensor(real), kid_subsets=20,
                                                    kid_subset_size=50, rng_seed=2020, verbose=False)
    assert mean == pytest.approx(reference["kernel_inception_distance_mean"], rel=1e-9)
    assert std == pytest.approx(reference["kernel_inception_distance_std"], rel=1e-9)
    with pytest.raises(ValueError, match="subset size"):
        kernel_inception_distance(generated, real, subset_size=500)


def test_precision_recall_match_torch_fidelity(two_feature_sets):
    real, generated = two_feature_sets
    precision, recall = precision_recall(real, generated, k=3)
    ref_precision, ref_recall = fidelity_prc.calculate_precision_recall_full(
        torch.tensor(generated, dtype=torch.float32), torch.tensor(real, dtype=torch.float32), neighborhood=3)
    assert (precision, recall) == (pytest.approx(ref_precision), pytest.approx(ref_recall))
    assert 0 < precision < 1 and 0 < recall < 1  # a non-degenerate case


def test_psnr_and_ssim_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    photo = pytest.importorskip("skimage.data").astronaut()[100:164, 150:230]
    noisy = np.clip(photo + np.random.default_rng(4).normal(0, 12, photo.shape), 0, 255).astype(np.uint8)
    assert psnr(noisy[None], photo[None])[0] == pytest.approx(
        metrics.peak_signal_noise_ratio(photo, noisy, data_range=255), rel=1e-9)
    expected = metrics.structural_similarity(photo, noisy, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=255)
    assert ssim(noisy[None], photo[None])[0] == pytest.approx(expected, rel=1e-7)
    assert ssim(photo[None], photo[None])[0] == pytest.approx(1.0)

"""The mathematics of the metrics, on features or image arrays; no file handling, no network.

Definitions follow the ADM evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) unless noted:

- Gaussian statistics: mean and unbiased covariance (``np.cov``, ddof 1) in float64.
- Frechet distance: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. The trace of the square root is
  computed as ``sum(sqrt(eig(A S2 A)))`` with ``A = S1^(1/2)``: ``A S2 A`` is symmetric positive semi-definite and
  has the eigenvalues of ``S1 S2``, so symmetric eigensolvers suffice, negative round-off eigenvalues are clipped
  to zero and nothing complex appears (scipy's ``sqrtm`` of the non-symmetric product needs neither a retry with
  an eps offset nor dropping imaginary parts).
- Precision / recall (Kynkaanniemi et al. 2019), k = 3: a sample's manifold radius is the distance to its k-th
  nearest neighbour in its own set, the point itself counting as neighbour 0; precision is the fraction of
  generated samples within the radius of some real sample, recall the converse. Distances are float32 Euclidean
  (torch-fidelity's; ADM computes them in float16 when finite, which can flip ties at that precision).
- Inception Score: softmax of the 1008 bias-free logits in float64, contiguous splits (no shuffling, as ADM;
  ADM's 5000-sample splits are the same as 10 splits at 50,000 samples), mean and population std over splits.
- KID: unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3`` over random subsets drawn with
  ``np.random.RandomState(seed)``, first from the generated then from the real features (torch-fidelity's order).
- PSNR / SSIM on RGB images in [0, 255] (see :func:`psnr`, :func:`ssim`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_float64(name: str, array, ndim: int) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) in float64 of (N, D) features; needs N >= 2."""
    features = _as_float64("features", features, 2)
    if features.shape[0] < 2:
        raise ValueError(f"statistics need at least 2 samples, got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def sqrtm_psd(matrix) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition.

    The input is symmetrised, eigenvalues below zero (round-off on singular matrices) are clipped to zero,
    so the result is real, symmetric and finite for any finite symmetric input.
    """
    matrix = _as_float64("matrix", matrix, 2)
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square, got shape {matrix.shape}")
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = _as_float64("mu1", mu1, 1), _as_float64("mu2", mu2, 1)
    sigma1, sigma2 = _as_float64("sigma1", sigma1, 2), _as_float64("sigma2", sigma2, 2)
    dim = mu1.shape[0]
    for name, shape in (("mu2", mu2.shape), ("sigma1", sigma1.shape), ("sigma2", sigma2.shape)):
        expected = (dim,) if name == "mu2" else (dim, dim)
        if shape != expected:
            raise ValueError(f"statistics do not match: mu1 has dimension {dim} but {name} has shape {shape}")
    root1 = sqrtm_psd(sigma1)
    product = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits`` contiguous splits) of (N, 1008) bias-free logits."""
    logits = torch.as_tensor(_as_float64("logits", logits, 2))
    count = logits.shape[0]
    if count < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} samples, got {count}")
    log_p = logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part = log_p[i * count // splits:(i + 1) * count // splits]
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_distances(features: torch.Tensor, k: int, block: int) -> torch.Tensor:
    return torch.cat([torch.cdist(rows, features).kthvalue(k + 1, dim=1).values for rows in features.split(block)])


def _fraction_within(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    inside = [(torch.cdist(rows, centres) <= radii).any(dim=1) for rows in queries.split(block)]
    return float(torch.cat(inside).float().mean())


def precision_recall(real_features, generated_features, k: int = 3, block: int = 10000,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall with k-nearest-neighbour manifolds (k = 3 in the ADM protocol)."""
    real = torch.as_tensor(np.asarray(real_features, dtype=np.float32), device=device)
    fake = torch.as_tensor(np.asarray(generated_features, dtype=np.float32), device=device)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature shapes do not match: {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, "
                         f"got {len(real)} real and {len(fake)} generated")
    real_radii = _kth_neighbour_distances(real, k, block)
    fake_radii = _kth_neighbour_distances(fake, k, block)
    return _fraction_within(fake, real, real_radii, block), _fraction_within(real, fake, fake_radii, block)


def kernel_inception_distance(generated_features, real_features, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 2020) -> tuple[float, float]:
    """KID (mean, std over ``subsets``) with the cubic polynomial kernel; ``subset_size`` <= both set sizes."""
    fake = _as_float64("generated_features", generated_features, 2)
    real = _as_float64("real_features", real_features, 2)
    if subset_size > min(len(fake), len(real)) or subset_size < 2:
        raise ValueError(f"KID subset size {subset_size} must be in [2, min(#generated={len(fake)}, "
                         f"#real={len(real)})]")
    dim = fake.shape[1]
    rng = np.random.RandomState(seed)
    m = subset_size
    values = []
    for _ in range(subsets):
        x = fake[rng.choice(len(fake), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        k_xx, k_yy, k_xy = ((a @ b.T / dim + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values.append(within - 2 * k_xy.sum() / (m * m))
    return float(np.mean(values)), float(np.std(values))


def _as_image_batch(name: str, images) -> torch.Tensor:
    # float64 copy (numpy arrays may be read-only views, e.g. of an image file)
    images = images.double() if torch.is_tensor(images) else torch.from_numpy(np.array(images, dtype=np.float64))
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must be (N, H, W, 3) RGB in [0, 255], got shape {tuple(images.shape)}")
    return images


def psnr(images1, images2) -> np.ndarray:
    """Per-image PSNR in dB of (N, H, W, 3) RGB images in [0, 255]: 10 log10(255^2 / MSE over all channels)."""
    a, b = _as_image_batch("images1", images1), _as_image_batch("images2", images2)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    mse = ((a - b) ** 2).flatten(1).mean(dim=1)
    return (10 * torch.log10(255.0 ** 2 / mse)).numpy()  # identical images give +inf


def ssim(images1, images2) -> np.ndarray:
    """Per-image SSIM of (N, H, W, 3) RGB images in [0, 255] (Wang et al. 2004), averaged over channels.

    Gaussian window sigma 1.5 truncated at 11x11, K1 = 0.01, K2 = 0.03, data range 255, population statistics,
    mean over the 'valid' positions: the same as ``skimage.metrics.structural_similarity(..., channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``.
    """
    a, b = _as_image_batch("images1", images1), _as_image_batch("images2", images2)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2)
    taps = torch.exp(-0.5 * (torch.arange(11, dtype=torch.float64) - 5) ** 2 / 1.5 ** 2)
    taps = taps / taps.sum()
    window = (taps[:, None] * taps[None, :]).expand(3, 1, 11, 11)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=3)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1).numpy()

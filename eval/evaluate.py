"""The two evaluations the CLI runs, as library functions returning plain dictionaries.

- :func:`evaluate_samples`: generated samples against a reference set (ADM protocol): FID, sFID, precision,
  recall, Inception Score (when the weights have logits), optionally KID.
- :func:`evaluate_reconstructions`: reconstructions against their originals, paired by file name: rFID, PSNR,
  SSIM, and LPIPS when VGG16 weights are given.

Metrics that cannot be computed are listed under ``unavailable`` with the reason; they are never estimated.
"""
from __future__ import annotations

import os

import numpy as np
from tqdm.auto import tqdm

from eval.features import PROTOCOL_VERSION, SetStatistics, reference_statistics, set_statistics
from eval.images import InputError, SubsetImages, open_images, pair_by_name
from eval.inception import InceptionFeatureExtractor
from eval.metrics import (frechet_distance, inception_score, kernel_inception_distance, precision_recall, psnr,
                          ssim)

PRECISION_RECALL_K = 3
INCEPTION_SCORE_SPLITS = 10


def _settings(extractor: InceptionFeatureExtractor, **extra) -> dict:
    return {"protocol": PROTOCOL_VERSION, "inception_weights": str(extractor.weights_path),
            "inception_weights_sha256": extractor.weights_sha256, "resize": "TF1 bilinear to 299x299",
            **extra}


def _fid_and_sfid(generated: SetStatistics, reference: SetStatistics, metrics: dict, unavailable: dict) -> None:
    metrics["fid"] = frechet_distance(generated.mu, generated.sigma, reference.mu, reference.sigma)
    if reference.mu_s is None:
        unavailable["sfid"] = "the reference statistics have no spatial (mu_s, sigma_s) statistics"
    else:
        metrics["sfid"] = frechet_distance(generated.mu_s, generated.sigma_s, reference.mu_s, reference.sigma_s)


def evaluate_samples(generated: str | os.PathLike, reference: str | os.PathLike, *,
                     extractor: InceptionFeatureExtractor | None = None, weights_path=None,
                     batch_size: int = 100, num_workers: int = 0, device: str = "cpu",
                     cache_dir: str | os.PathLike | None = None, kid: bool = False, kid_subset_size: int = 1000,
                     value_range: str | None = None, progress: bool = True, distributed: bool = False) -> dict:
    """Generated samples (folder, glob, ``.npz``) against a reference (folder, images or statistics ``.npz``)."""
    extractor = extractor or InceptionFeatureExtractor(weights_path)
    run = dict(batch_size=batch_size, num_workers=num_workers, device=device, progress=progress,
               distributed=distributed)
    samples = open_images(generated, value_range)
    gen = set_statistics(samples, extractor, desc="generated", **run)
    ref = reference_statistics(reference, extractor, value_range=value_range, cache_dir=cache_dir,
                               desc="reference", **run)
    metrics, unavailable = {}, {}
    _fid_and_sfid(gen, ref, metrics, unavailable)
    if ref.pool is None:
        unavailable["precision"] = unavailable["recall"] = "the reference file holds statistics but no images"
    else:
        metrics["precision"], metrics["recall"] = precision_recall(ref.pool, gen.pool, k=PRECISION_RECALL_K,
                                                                   device=device)
    if gen.logits is None:
        unavailable["inception_score"] = f"the weights ({extractor.weights_path.name}) have no logits layer"
    elif len(samples) < INCEPTION_SCORE_SPLITS:
        unavailable["inception_score"] = f"needs at least {INCEPTION_SCORE_SPLITS} samples"
    else:
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(
            gen.logits, INCEPTION_SCORE_SPLITS)
    if kid:
        if ref.pool is None:
            unavailable["kid"] = "the reference file holds statistics but no images"
        else:
            size = min(kid_subset_size, len(gen.pool), len(ref.pool))
            metrics["kid"], metrics["kid_std"] = kernel_inception_distance(gen.pool, ref.pool, subset_size=size)
    return {
        "mode": "generation", "generated": str(generated), "reference": str(reference),
        "num_generated": len(samples), "num_reference": ref.count,
        "metrics": metrics, "unavailable": unavailable,
        "settings": _settings(extractor, precision_recall_k=PRECISION_RECALL_K,
                              inception_score_splits=INCEPTION_SCORE_SPLITS, batch_size=batch_size,
                              device=str(device), sample_range=value_range or "auto"),
    }


def evaluate_reconstructions(reconstructions: str | os.PathLike, originals: str | os.PathLike, *,
                             extractor: InceptionFeatureExtractor | None = None, weights_path=None,
                             lpips_vgg: str | os.PathLike | None = None, batch_size: int = 100,
                             num_workers: int = 0, device: str = "cpu", cache_dir=None,
                             value_range: str | None = None, progress: bool = True,
                             distributed: bool = False) -> dict:
    """rFID, PSNR, SSIM (and LPIPS with ``lpips_vgg``) of reconstructions paired with originals by file name."""
    extractor = extractor or InceptionFeatureExtractor(weights_path)
    recon_all, orig_all = open_images(reconstructions, value_range), open_images(originals, value_range)
    recon_index, orig_index = pair_by_name(recon_all, orig_all)
    recon, orig = SubsetImages(recon_all, recon_index), SubsetImages(orig_all, orig_index)
    run = dict(batch_size=batch_size, num_workers=num_workers, device=device, progress=progress,
               distributed=distributed)
    recon_stats = set_statistics(recon, extractor, desc="reconstructions", **run)
    orig_stats = set_statistics(orig, extractor, cache_dir=cache_dir, desc="originals", **run)
    metrics, unavailable = {}, {}
    metrics["rfid"] = frechet_distance(recon_stats.mu, recon_stats.sigma, orig_stats.mu, orig_stats.sigma)

    lpips_model = None
    if lpips_vgg is None:
        unavailable["lpips"] = "no VGG16 weights given (--lpips-vgg)"
    else:
        from eval.perceptual import LPIPSVGG
        lpips_model = LPIPSVGG(lpips_vgg).to(device)
    per_image = {"psnr": [], "ssim": [], "lpips": []}
    for i in tqdm(range(len(recon)), desc="pixel metrics", unit="img", disable=not progress):
        a, b = recon[i], orig[i]  # one pair at a time: sizes may differ between pairs
        if a.shape != b.shape:
            raise InputError(f"{recon.names[i]}: reconstruction is {a.shape[:2]} but the original is "
                             f"{b.shape[:2]}; pixel metrics need equal sizes")
        per_image["psnr"].append(psnr(a[None], b[None])[0])
        per_image["ssim"].append(ssim(a[None], b[None])[0])
        if lpips_model is not None:
            per_image["lpips"].append(lpips_model(a[None], b[None])[0])
    metrics["psnr"] = float(np.mean(per_image["psnr"]))
    metrics["ssim"] = float(np.mean(per_image["ssim"]))
    if lpips_model is not None:
        metrics["lpips"] = float(np.mean(per_image["lpips"]))
    return {
        "mode": "reconstruction", "generated": str(reconstructions), "reference": str(originals),
        "num_generated": len(recon), "num_reference": len(orig),
        "metrics": metrics, "unavailable": unavailable,
        "settings": _settings(extractor, pairing="file stem", psnr="RGB, [0, 255], mean of per-image PSNR",
                              ssim="RGB, Gaussian 11x11 sigma 1.5, data range 255", batch_size=batch_size,
                              device=str(device), sample_range=value_range or "auto"),
    }

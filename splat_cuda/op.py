"""The CUDA renderer as PyTorch custom ops (`torch.library`), with its autograd formula.

`splat_cuda::render_forward(tokens, height, width, dmax, deterministic, zeroed_gradient) -> (map, masks,
accumulator)` renders the (B, C, H, W) map and leaves for the backward the tiles each token touches, as bits of
`masks` (B, tiles, ceil(N / 32)) int32; with `zeroed_gradient` it also returns a zeroed (B, N, 5 + C) float32
`accumulator` for the backward's atomic adds (zeroed by the forward kernel itself, which saves the backward a
fill kernel: about 2 us of the 63 at B64 N256 C32 on an H200), else an empty tensor.
`splat_cuda::render_backward(tokens, masks, grad_out, height, width, dmax, deterministic) -> (B, N, 5 + C)`
reuses `masks` (autograd keeps them; they are not differentiable);
`splat_cuda::render_backward_accumulate(tokens, masks, grad_out, accumulator, height, width, dmax)` adds the same
gradient, in float32, to an `accumulator` from the forward, and returns it in the tokens' dtype when that is 16-bit.
Every kernel covers the whole batch in one launch on PyTorch's current stream, as a programmatic dependent of the
kernel before it on sm_90 and newer (its launch overlaps that kernel's last blocks); the ops allocate only through
PyTorch and never synchronise with the host, so they work in eager mode, under `torch.compile(fullgraph=True)` (the
fake implementations give shapes) and inside CUDA-graph capture (after a first eager call has compiled and loaded
the kernels). `SPLAT_CUDA_DEPENDENT_LAUNCH=0` launches them as ordinary kernels instead.

Accumulation is fp32 whatever the token dtype; the output has the tokens' dtype, and so does the
gradient (computed in fp32, then cast). The default backward adds per-tile partial gradients with
float atomics, whose order varies from run to run; `deterministic=True` stores them in a
(B, tiles, N, 5 + C) fp32 buffer instead (4 * B * tiles * N * (5 + C) bytes) and sums it in a fixed
tile order, which makes gradients bitwise repeatable.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from . import nvrtc
from .compiler import (
    MAX_TOKENS,
    THREADS,
    TILE,
    channel_padding,
    load_kernels,
    min_blocks,
    shared_memory_bytes,
)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

_WARPS_PER_BLOCK = THREADS // 32
_DEPENDENT_LAUNCHES = os.environ.get("SPLAT_CUDA_DEPENDENT_LAUNCH", "1") != "0"


def _tiles(height: int, width: int) -> int:
    return ((height + TILE - 1) // TILE) * ((width + TILE - 1) // TILE)


def _launch(kernel, device: torch.device, grid: tuple[int, int], shmem: int, *args) -> None:
    nvrtc.launch(kernel, device.index, (grid[0], grid[1], 1), (THREADS, 1, 1), shmem, *args,
                 dependent=_DEPENDENT_LAUNCHES)


def _backward_grid(tokens: torch.Tensor, height: int, width: int, cpt: int) -> tuple[tuple[int, int], np.int32]:
    """The backward's grid (tiles, images), and whether the backward lets the next kernel launch as soon as all of
    its blocks have started (`early_dependents`): only when the grid spans more than one wave of blocks. A grid of
    one wave starts all its blocks at once, and a dependent launched then has its blocks wait on the first SMs to
    free up, as many per SM as fit, which leaves the other SMs idle once it runs (measured on an H200 with the
    forward after the backward of the one-wave M128 batch, about 4 blocks per SM on half the SMs: fwd+bwd 12.6 ->
    14.0-14.3 us; at B64 N256 C32, 3 waves, the early launch gains 0.3-0.5 us; benchmarks/RESULTS.md)."""
    grid = (_tiles(height, width), tokens.shape[0])
    sms = torch.cuda.get_device_properties(tokens.device).multi_processor_count
    return grid, np.int32(grid[0] * grid[1] > sms * min_blocks(cpt)[1])


def _kernels(tokens: torch.Tensor):
    channels = tokens.shape[-1] - 5
    return load_kernels(tokens.device.index, DTYPE_NAMES[tokens.dtype], channel_padding(channels))


def _check_tokens(tokens: torch.Tensor) -> None:
    if not tokens.is_cuda:
        raise ValueError(f"splat_cuda CUDA op: tokens must be on a CUDA device, got {tokens.device}")
    if tokens.dtype not in DTYPE_NAMES:
        raise TypeError(f"splat_cuda CUDA op: tokens must be one of {list(DTYPE_NAMES)}, got {tokens.dtype}")
    if tokens.dim() != 3 or tokens.shape[-1] <= 5:
        raise ValueError(f"splat_cuda CUDA op: tokens must be (B, N, 5 + C), got {tuple(tokens.shape)}")
    if not tokens.is_contiguous():
        raise ValueError("splat_cuda CUDA op: tokens must be contiguous (splat_cuda.render makes them so)")
    if tokens.shape[1] > MAX_TOKENS:
        raise ValueError(f"splat_cuda CUDA op: at most {MAX_TOKENS} tokens per image, got {tokens.shape[1]}")


def _mask_shape(batch: int, num: int, height: int, width: int) -> tuple[int, int, int]:
    return batch, _tiles(height, width), (num + 31) // 32


def _accumulator_shape(tokens: torch.Tensor, zeroed_gradient: bool) -> tuple[int, ...]:
    return tuple(tokens.shape) if zeroed_gradient else (0,)


@torch.library.custom_op("splat_cuda::render_forward", mutates_args=(), device_types="cuda")
def render_forward(tokens: torch.Tensor, height: int, width: int, dmax: float, deterministic: bool,
                   zeroed_gradient: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 5 + C) tokens -> (B, C, H, W) map, plus `masks` for the backward and, with `zeroed_gradient`, a
    zeroed (B, N, 5 + C) float32 accumulator for `render_backward_accumulate` (else an empty tensor).

    `deterministic` only matters to the backward (which then sums per-tile buffers instead of an accumulator).
    """
    _check_tokens(tokens)
    if deterministic and zeroed_gradient:
        raise ValueError("splat_cuda forward: the deterministic backward takes no zeroed gradient accumulator")
    batch, num, dim = tokens.shape
    kernels = _kernels(tokens)
    out = torch.empty(batch, dim - 5, height, width, dtype=tokens.dtype, device=tokens.device)
    masks = torch.empty(_mask_shape(batch, num, height, width), dtype=torch.int32, device=tokens.device)
    accumulator = torch.empty(_accumulator_shape(tokens, zeroed_gradient), dtype=torch.float32, device=tokens.device)
    if tokens.numel() == 0 or out.numel() == 0:  # nothing to draw (the backward returns zeros for N = 0)
        return out.zero_(), masks.zero_(), accumulator.zero_()
    with torch.cuda.device(tokens.device):
        _launch(kernels.forward, tokens.device, (_tiles(height, width), batch), shared_memory_bytes(kernels.cpt, False),
                tokens.data_ptr(), masks.data_ptr(), out.data_ptr(), accumulator.data_ptr() if zeroed_gradient else 0,
                *_sizes(tokens, height, width), np.float32(dmax))
    return out, masks, accumulator


@render_forward.register_fake
def _render_forward_fake(tokens, height, width, dmax, deterministic, zeroed_gradient):
    batch, num, dim = tokens.shape
    return (tokens.new_empty(batch, dim - 5, height, width),
            tokens.new_empty(_mask_shape(batch, num, height, width), dtype=torch.int32),
            tokens.new_empty(_accumulator_shape(tokens, zeroed_gradient), dtype=torch.float32))


def _check_backward_inputs(tokens: torch.Tensor, grad_out: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`grad_out` in the tokens' dtype, contiguous, after checking the tokens and its shape and device."""
    _check_tokens(tokens)
    batch, _, dim = tokens.shape
    expected = (batch, dim - 5, height, width)
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"splat_cuda backward: grad_out must be {expected}, got {tuple(grad_out.shape)}")
    if grad_out.device != tokens.device:
        raise ValueError(f"splat_cuda backward: grad_out is on {grad_out.device}, tokens on {tokens.device}")
    return grad_out.to(tokens.dtype).contiguous()


def _sizes(tokens: torch.Tensor, height: int, width: int) -> tuple:
    _, num, dim = tokens.shape
    return np.int32(num), np.int32(dim - 5), np.int32(height), np.int32(width)


def _accumulate(tokens: torch.Tensor, masks: torch.Tensor, grad_out: torch.Tensor, grad: torch.Tensor, height: int,
                width: int, dmax: float) -> None:
    """Adds dL/dtokens to the zeroed or partly summed float32 `grad` (B, N, 5 + C) by atomics."""
    kernels = _kernels(tokens)
    grid, early_dependents = _backward_grid(tokens, height, width, kernels.cpt)
    with torch.cuda.device(tokens.device):
        _launch(kernels.backward, tokens.device, grid, shared_memory_bytes(kernels.cpt, True), tokens.data_ptr(),
                masks.data_ptr(), grad_out.data_ptr(), grad.data_ptr(), *_sizes(tokens, height, width),
                np.float32(dmax), early_dependents)


def _in_token_dtype(tokens: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The float32 gradient `grad` in the tokens' dtype, by a kernel of ours (launched as a dependent of the
    backward, unlike PyTorch's cast); float32 `grad` itself for float32 tokens."""
    if tokens.dtype == torch.float32:
        return grad
    out = torch.empty_like(tokens)
    values = grad.numel()
    if values == 0:
        return out
    with torch.cuda.device(tokens.device):
        _launch(_kernels(tokens).cast_gradient, tokens.device, (-(-values // (4 * THREADS)), 1), 0,
                grad.data_ptr(), out.data_ptr(), np.int64(values))
    return out


@torch.library.custom_op("splat_cuda::render_backward", mutates_args=(), device_types="cuda")
def render_backward(tokens: torch.Tensor, masks: torch.Tensor, grad_out: torch.Tensor,
                    height: int, width: int, dmax: float, deterministic: bool) -> torch.Tensor:
    """dL/dtokens (B, N, 5 + C) from dL/dout (B, C, H, W), in the tokens' dtype."""
    grad_out = _check_backward_inputs(tokens, grad_out, height, width)
    if tokens.numel() == 0 or grad_out.numel() == 0:
        return torch.zeros_like(tokens)
    if not deterministic:
        grad = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
        _accumulate(tokens, masks, grad_out, grad, height, width, dmax)
        return _in_token_dtype(tokens, grad)
    batch, num, dim = tokens.shape
    kernels = _kernels(tokens)
    grid, early_dependents = _backward_grid(tokens, height, width, kernels.cpt)
    sizes = _sizes(tokens, height, width)
    with torch.cuda.device(tokens.device):
        partial = torch.empty(batch, grid[0], num, dim, dtype=torch.float32, device=tokens.device)
        grad = torch.empty(batch, num, dim, dtype=torch.float32, device=tokens.device)
        _launch(kernels.backward_deterministic, tokens.device, grid, shared_memory_bytes(kernels.cpt, True),
                tokens.data_ptr(), masks.data_ptr(), grad_out.data_ptr(), partial.data_ptr(), *sizes,
                np.float32(dmax), early_dependents)
        blocks = (batch * num + _WARPS_PER_BLOCK - 1) // _WARPS_PER_BLOCK
        _launch(kernels.reduce_tile_gradients, tokens.device, (blocks, 1), 0,
                tokens.data_ptr(), masks.data_ptr(), partial.data_ptr(), grad.data_ptr(), np.int32(batch), *sizes,
                np.float32(dmax))
    return _in_token_dtype(tokens, grad)


@render_backward.register_fake
def _render_backward_fake(tokens, masks, grad_out, height, width, dmax, deterministic):
    return torch.empty_like(tokens)


@torch.library.custom_op("splat_cuda::render_backward_accumulate", mutates_args=("accumulator",),
                         device_types="cuda")
def render_backward_accumulate(tokens: torch.Tensor, masks: torch.Tensor, grad_out: torch.Tensor,
                               accumulator: torch.Tensor, height: int, width: int, dmax: float) -> torch.Tensor:
    """Adds dL/dtokens from dL/dout (B, C, H, W), in float32, to `accumulator` (B, N, 5 + C) float32 (one from
    `render_forward(..., zeroed_gradient=True)`); returns the sum in the tokens' dtype when that is 16-bit, else an
    empty tensor (the accumulator is the gradient)."""
    grad_out = _check_backward_inputs(tokens, grad_out, height, width)
    if accumulator.shape != tokens.shape or accumulator.dtype != torch.float32 or not accumulator.is_contiguous():
        raise ValueError(f"splat_cuda backward: the accumulator must be a contiguous float32 {tuple(tokens.shape)} "
                         f"tensor, got {accumulator.dtype} {tuple(accumulator.shape)}")
    if tokens.numel() and grad_out.numel():
        _accumulate(tokens, masks, grad_out, accumulator, height, width, dmax)
    return tokens.new_empty(0) if tokens.dtype == torch.float32 else _in_token_dtype(tokens, accumulator)


@render_backward_accumulate.register_fake
def _render_backward_accumulate_fake(tokens, masks, grad_out, accumulator, height, width, dmax):
    return tokens.new_empty(0) if tokens.dtype == torch.float32 else torch.empty_like(tokens)


def _setup_context(ctx, inputs, output):
    tokens, height, width, dmax, deterministic, _ = inputs
    _, masks, accumulator = output
    ctx.mark_non_differentiable(masks, accumulator)
    # (no zero tensors for the gradients of masks and accumulator, which nothing reads: two fill kernels per call)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(tokens, masks)
    ctx.render_args = (height, width, dmax)
    ctx.deterministic = deterministic
    # The zeroed accumulator serves one backward; a second one (retain_graph=True) allocates its own. Kept as an
    # attribute, not a saved tensor: the backward adds into it, and autograd forbids changing saved tensors.
    ctx.accumulator = accumulator if accumulator.numel() else None


def _backward(ctx, grad_out, _grad_masks, _grad_accumulator):
    if grad_out is None:  # (the map took no part in what is differentiated)
        return None, None, None, None, None, None
    tokens, masks = ctx.saved_tensors
    accumulator, ctx.accumulator = ctx.accumulator, None
    if accumulator is not None:
        cast = render_backward_accumulate(tokens, masks, grad_out, accumulator, *ctx.render_args)
        grad = accumulator if tokens.dtype == torch.float32 else cast
    else:
        grad = render_backward(tokens, masks, grad_out, *ctx.render_args, ctx.deterministic)
    return grad, None, None, None, None, None


render_forward.register_autograd(_backward, setup_context=_setup_context)


def render_cuda(tokens: torch.Tensor, height: int, width: int, dmax: float = 3.0,
                deterministic: bool = False) -> torch.Tensor:
    """Render CUDA tokens (B, N, 5 + C), C <= 64, fp32/bf16/fp16 -> (B, C, H, W) with the kernels.

    When a gradient will be wanted (grad mode on, tokens requiring it) and atomics are allowed, the forward kernel
    also zeroes the backward's accumulator. Not under `torch.compile`, whose functionalization would copy a buffer
    that the backward changes in place: there the backward allocates its own."""
    tokens = tokens.contiguous()
    zeroed_gradient = (not deterministic and tokens.requires_grad and torch.is_grad_enabled()
                       and not torch.compiler.is_compiling())
    out, _, _ = render_forward(tokens, int(height), int(width), float(dmax), bool(deterministic), zeroed_gradient)
    return out

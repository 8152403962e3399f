"""The CUDA renderer: NVRTC compilation on any machine, correctness and integration on a GPU.

CPU-only CI compiles every kernel variant (syntax and template instantiation for all dtypes and
channel paddings, and complete cubins for one variant) for sm_80 and sm_90. GPU tests compare
against the float64 reference (`splat_cuda.render_reference`, itself checked against a dense
oracle in test_render_reference.py).
"""
from __future__ import annotations

import functools
import importlib
from pathlib import Path

import pytest
import torch

from render_tokens import random_tokens as shared_random_tokens, rel_err
from splat_cuda import render, render_reference

compiler = pytest.importorskip("splat_cuda.compiler")
pytest.importorskip("cuda.core")
from splat_cuda import nvrtc  # noqa: E402

ARCHS = ("sm_80", "sm_90")


# ---------------------------------------------------------------- compilation (no GPU needed)

@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_parses_and_instantiates(arch):
    for dtype_name in compiler.STORAGE_TYPES:
        for cpt in compiler.CHANNEL_PADDINGS:
            compiler.compile_variant(dtype_name, cpt, arch, syntax_only=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_variant_compiles_to_cubin(arch):
    cubin = compiler.compile_variant("bfloat16", 4, arch)
    assert cubin[:4] == b"\x7fELF"
    for name in compiler.KERNEL_NAMES:
        assert name.encode() in cubin


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_compiles_to_cubin(arch):
    for dtype_name in compiler.STORAGE_TYPES:
        for cpt in compiler.CHANNEL_PADDINGS:
            assert compiler.compile_variant(dtype_name, cpt, arch)[:4] == b"\x7fELF"


def test_whatif_edits_match_the_kernels_and_compile(monkeypatch):
    """benchmarks/renderer_whatif.py times builds with one part removed by textual edits of render.cu: each edit must
    still match the source exactly once (or the script would time something else) and each edited source compile."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    whatif = importlib.import_module("renderer_whatif")
    for dtype_name in ("float32", "bfloat16"):
        source = compiler.variant_source(dtype_name, 32)
        for name, (_, edits) in whatif.VARIANTS.items():
            edited = whatif.apply_edits(source, edits)
            assert (edited != source) == bool(edits), name
            nvrtc.compile_source(edited, "sm_90", name=f"what-if {name}", syntax_only=True)
    with pytest.raises(ValueError, match="exactly once"):
        whatif.apply_edits("int x;", [("int y;", "")])


def test_compile_error_names_the_variant(monkeypatch):
    monkeypatch.setattr(compiler, "variant_source", lambda d, c: "this is not C++")
    with pytest.raises(RuntimeError, match="float32/c8 for sm_90"):
        compiler.compile_variant("float32", 8, "sm_90", syntax_only=True)


def test_disk_cache_compiles_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLAT_CUDA_CACHE", str(tmp_path))
    calls = []
    real = compiler.compile_variant

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(compiler, "compile_variant", counting)
    first = compiler.cached_cubin("float32", 4, "sm_90")
    second = compiler.cached_cubin("float32", 4, "sm_90")
    assert first == second and len(calls) == 1
    files = list(tmp_path.glob("*.cubin"))
    assert len(files) == 1 and files[0].read_bytes() == first
    compiler.cached_cubin("float32", 4, "sm_80")  # another architecture is another entry
    assert len(list(tmp_path.glob("*.cubin"))) == 2 and len(calls) == 2


def test_channel_padding_and_limits():
    assert [compiler.channel_padding(c) for c in (1, 3, 4, 5, 16, 17, 33, 64)] == [4, 4, 4, 8, 16, 32, 64, 64]
    with pytest.raises(ValueError, match="at most 64 channels"):
        compiler.channel_padding(65)
    with pytest.raises(TypeError, match="float64"):
        compiler.variant_source("float64", 4)


# ---------------------------------------------------------------- GPU

# Tokens of every difficulty: tiny sigma, rho near +-1, centres partly outside the map.
random_tokens = functools.partial(shared_random_tokens, sigma=(0.01, 0.3), rho=0.999, centre=1.15,
                                  dtype=torch.float32, device="cuda")


def cuda_and_reference(tokens, size, weight_seed=1):
    """Forward and gradient (of sum(out * weight)) from the kernels and from the float64 reference."""
    gen = torch.Generator().manual_seed(weight_seed)
    batch, _, dim = tokens.shape
    weight = torch.randn(batch, dim - 5, *size, generator=gen).to(tokens.device)
    a = tokens.clone().requires_grad_()
    out = render(a, size)
    (out.double() * weight.double()).sum().backward()
    b = tokens.double().clone().requires_grad_()
    ref = render_reference(b, *size)
    (ref * weight.double()).sum().backward()
    return out, a.grad, ref, b.grad


def assert_matches(tokens, size, fwd_tol=1e-5, grad_tol=1e-4):
    out, grad, ref, ref_grad = cuda_and_reference(tokens, size)
    assert out.dtype == tokens.dtype and out.shape == ref.shape
    assert ref.abs().max() > 0.05, "test case renders an empty map"
    assert rel_err(out, ref) <= fwd_tol
    # gradients per component group, so that large ones cannot hide errors in small ones
    for name, sl in (("sigma", slice(0, 2)), ("rho", slice(2, 3)), ("mu", slice(3, 5)), ("features", slice(5, None))):
        assert rel_err(grad[..., sl], ref_grad[..., sl]) <= grad_tol, name


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [1, 3, 16, 32, 64])
def test_channels(channels):
    assert_matches(random_tokens(3, 200, channels, seed=channels), (64, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("size", [(16, 16), (37, 50), (63, 17), (128, 96)])
def test_map_sizes(size):
    assert_matches(random_tokens(2, 300, 8, seed=size[0]), size)


@pytest.mark.gpu
def test_one_token_and_tokens_outside_the_map():
    assert_matches(random_tokens(4, 1, 5, sigma=(0.3, 0.6), centre=0.5, seed=2), (31, 33))
    far = random_tokens(2, 50, 4, seed=3)
    far[..., 3:5] = far[..., 3:5].sign() * (1.0 + 4.0 * far[..., 0:2])  # wholly outside: nothing drawn
    inside = random_tokens(2, 50, 4, seed=4, centre=0.9)
    assert_matches(torch.cat([far, inside], 1), (40, 40))
    assert render(far, 40).abs().max() == 0


@pytest.mark.gpu
def test_extreme_geometry():
    tokens = random_tokens(2, 400, 16, seed=5)
    tokens[:, :100, 2] = torch.tensor([0.999, -0.999]).repeat(50).to(tokens.device)
    tokens[:, 100:150, 0:2] = 1e-4                         # tiny sigma: at most a pixel lit
    tokens[:, 100:150, 3:5] = torch.round((tokens[:, 100:150, 3:5] + 1) * 31.5) / 31.5 - 1  # on pixel centres
    assert_matches(tokens, (64, 64))


@pytest.mark.gpu
def test_high_resolution_4096_tokens():
    cell = (2.0 / 3.0) / 64
    assert_matches(random_tokens(1, 4096, 32, sigma=(0.5 * cell, 3 * cell), centre=1.0, seed=6), (256, 256))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_features(dtype):
    tokens = random_tokens(2, 200, 16, rho=0.9, seed=7).to(dtype)
    out, grad, ref, ref_grad = cuda_and_reference(tokens, (48, 48))
    assert out.dtype == dtype and grad.dtype == dtype
    assert rel_err(out, ref) < 1e-2
    assert rel_err(grad[..., 5:], ref_grad[..., 5:]) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size, channels", [((48, 48), 16), ((37, 50), 3), ((64, 64), 64), ((36, 40), 40)])
def test_half_precision_map_is_the_float32_map_rounded(dtype, size, channels):
    """16-bit maps leave through shared memory, four pixels per store (whole tiles of maps whose rows are multiples of
    4 pixels, in two passes at 64 channels), or pixel by pixel (edge tiles, other widths): either way each value is
    the float32 kernel's, rounded (the kernels accumulate alike; the tolerance is one rounding step)."""
    tokens = random_tokens(2, 200, channels, rho=0.9, seed=8).to(dtype)
    out = render(tokens, size)
    expected = render(tokens.float(), size).to(dtype)
    assert out.abs().max() > 0.05
    torch.testing.assert_close(out.float(), expected.float(), rtol=torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size, channels", [((48, 64), 16), ((48, 40), 8), ((37, 50), 3), ((32, 33), 32),
                                            ((32, 48), 64), ((36, 40), 40)])
def test_half_precision_gradient_is_the_float32_kernels(dtype, size, channels):
    """The 16-bit backward converts dL/dout and the tokens to float32 as it reads them and computes in float32, so its
    float32 accumulator equals the float32 kernels' on the same (16-bit) values, up to the order of the atomic adds
    (whole and edge tiles, odd widths, channel counts equal to a padding or not)."""
    from splat_cuda import op

    tokens = random_tokens(2, 150, channels, rho=0.9, seed=31).to(dtype)
    gout = torch.randn(2, channels, *size, device="cuda").to(dtype)
    _, masks, half_sum = op.render_forward(tokens, *size, 3.0, False, True)
    op.render_backward_accumulate(tokens, masks, gout, half_sum, *size, 3.0)
    _, masks, float_sum = op.render_forward(tokens.float(), *size, 3.0, False, True)
    op.render_backward_accumulate(tokens.float(), masks, gout.float(), float_sum, *size, 3.0)
    assert float_sum.abs().max() > 0.1
    torch.testing.assert_close(half_sum, float_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_deterministic_mode_is_bitwise_repeatable():
    tokens = random_tokens(4, 500, 32, rho=0.9, seed=8)
    gout = torch.randn(4, 32, 64, 64, device="cuda")

    def grad(deterministic):
        t = tokens.clone().requires_grad_()
        render(t, 64, deterministic=deterministic).backward(gout)
        return t.grad

    first = grad(True)
    for _ in range(3):
        assert torch.equal(grad(True), first)
    assert rel_err(grad(False), first) < 1e-6


@pytest.mark.gpu
def test_forward_zeroes_the_backward_accumulator():
    """With a gradient wanted, the forward kernel zeroes the backward's float32 accumulator (so that the backward
    needs no fill kernel): the buffer comes back zero from memory full of NaN, the gradient added into it equals the
    backward's that zeroes its own buffer, and a second backward through the same graph (retain_graph) gets a fresh
    buffer instead of adding to the spent one."""
    from splat_cuda import op

    tokens = random_tokens(3, 300, 24, seed=21)
    size = (40, 56)
    gout = torch.randn(3, 24, *size, device="cuda")
    dirty = [torch.full(tokens.shape, float("nan"), device="cuda") for _ in range(8)]
    del dirty
    assert torch.isnan(torch.empty(tokens.shape, device="cuda")).all()  # the allocator hands out the NaN blocks
    _, masks, accumulator = op.render_forward(tokens, *size, 3.0, False, True)
    assert accumulator.shape == tokens.shape and accumulator.dtype == torch.float32
    assert torch.count_nonzero(accumulator) == 0
    assert op.render_backward_accumulate(tokens, masks, gout, accumulator, *size, 3.0).numel() == 0
    expected = op.render_backward(tokens, masks, gout, *size, 3.0, False)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(accumulator, expected, rtol=1e-5, atol=1e-5)

    leaf = tokens.clone().requires_grad_()
    out = render(leaf, size)
    first, = torch.autograd.grad(out, leaf, gout, retain_graph=True)
    second, = torch.autograd.grad(out, leaf, gout)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="accumulator must be"):
        op.render_backward_accumulate(tokens, masks, gout, accumulator.double(), *size, 3.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradient_is_the_float32_sum_rounded(dtype):
    """16-bit tokens: the backward sums in float32 and returns the sum rounded once to the tokens' dtype, by its own
    cast kernel (four values per thread, the rest one by one: 5 x 301 x 23 values leave 3 over)."""
    from splat_cuda import op

    tokens = random_tokens(5, 301, 18, rho=0.9, seed=23).to(dtype)  # (bf16 rounds 0.999 to 1)
    size = (72, 88)
    gout = torch.randn(5, 18, *size, device="cuda", dtype=dtype)
    _, masks, accumulator = op.render_forward(tokens, *size, 3.0, False, True)
    cast = op.render_backward_accumulate(tokens, masks, gout, accumulator, *size, 3.0)
    assert cast.dtype == dtype and cast.shape == tokens.shape
    assert accumulator.abs().max() > 0.1
    assert torch.equal(cast, accumulator.to(dtype))
    leaf = tokens.clone().requires_grad_()
    grad, = torch.autograd.grad(render(leaf, size), leaf, gout)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), accumulator, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    tokens = random_tokens(2, 128, 16, seed=9).requires_grad_()
    gout = torch.randn(2, 16, 64, 64, device="cuda")

    def step():  # deterministic: replay and eager must agree bit for bit
        out = render(tokens, 64, deterministic=True)
        (grad,) = torch.autograd.grad(out, tokens, gout)
        return out, grad

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and load before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static, grad_static = step()
    with torch.no_grad():
        tokens.copy_(random_tokens(2, 128, 16, seed=10))
    graph.replay()
    out_eager, grad_eager = step()
    torch.testing.assert_close(out_static, out_eager, rtol=0, atol=0)
    torch.testing.assert_close(grad_static, grad_eager, rtol=0, atol=0)
    assert grad_static.abs().max() > 0


@pytest.mark.gpu
def test_torch_compile_fullgraph_and_opcheck():
    from splat_cuda import op

    tokens = random_tokens(2, 64, 8, seed=11)

    def loss(t):
        return render(t, (32, 40)).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    a, b = tokens.clone().requires_grad_(), tokens.clone().requires_grad_()
    compiled(a).backward()
    loss(b).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(op.render_forward, (tokens, 32, 40, 3.0, True, False))
    for dtype in (torch.float32, torch.bfloat16):
        typed = tokens.to(dtype)
        _, masks, accumulator = op.render_forward(typed, 32, 40, 3.0, False, True)
        torch.library.opcheck(op.render_forward, (typed, 32, 40, 3.0, False, True))
        torch.library.opcheck(op.render_backward_accumulate, (typed, masks, torch.randn(2, 8, 32, 40, device="cuda"),
                                                              accumulator, 32, 40, 3.0))


@pytest.mark.gpu
def test_dispatch_and_errors():
    tokens = random_tokens(2, 30, 70, seed=12)  # more channels than the kernels hold: reference
    torch.testing.assert_close(render(tokens, 20), render_reference(tokens, 20, 20))
    view = random_tokens(30, 2, 4, seed=13).transpose(0, 1)  # non-contiguous: copied first
    torch.testing.assert_close(render(view, 24), render(view.contiguous(), 24), rtol=0, atol=0)
    from splat_cuda import op

    with pytest.raises(ValueError, match="contiguous"):
        op.render_forward(view, 24, 24, 3.0, False, False)
    small = tokens[..., :9].contiguous()
    _, masks, _ = op.render_forward(small, 6, 6, 3.0, False, False)
    with pytest.raises(ValueError, match="grad_out must be"):
        op.render_backward(small, masks, torch.zeros(2, 4, 5, 5, device="cuda"), 6, 6, 3.0, False)
    with pytest.raises(ValueError, match="on cpu"):
        op.render_backward(small, masks, torch.zeros(2, 4, 6, 6), 6, 6, 3.0, False)
    with pytest.raises(ValueError, match="at most 8192 tokens"):
        op.render_forward(random_tokens(1, 8193, 4, seed=14), 16, 16, 3.0, False, False)

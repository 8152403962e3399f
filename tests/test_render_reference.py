"""The PyTorch reference renderer against a dense float64 oracle written straight from SPEC.md section 2."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import splat_cuda
from render_tokens import random_tokens as shared_random_tokens, rel_err
from splat_cuda import reference, render, render_reference


def dense_oracle(tokens: torch.Tensor, height: int, width: int, dmax: float = 3.0) -> torch.Tensor:
    """SPEC.md section 2 literally, in float64, every token at every pixel (differentiable)."""
    t = tokens.double()
    sx, sy, rho, mx, my = (t[..., i, None, None] for i in range(5))
    xs = torch.tensor([2.0 * j / (width - 1) - 1.0 for j in range(width)], dtype=torch.float64)
    ys = torch.tensor([2.0 * i / (height - 1) - 1.0 for i in range(height)], dtype=torch.float64)
    dx = xs.view(1, 1, 1, width) - mx
    dy = ys.view(1, 1, height, 1) - my
    quad = dx**2 / sx**2 - 2 * rho * dx * dy / (sx * sy) + dy**2 / sy**2
    box = ((dx.abs() <= dmax * sx) & (dy.abs() <= dmax * sy)).double()
    g = torch.exp(-quad / (2 * (1 - rho**2))) * box
    return torch.einsum("bnhw,bnc->bchw", g, t[..., 5:])


random_tokens = functools.partial(shared_random_tokens, sigma=(0.02, 0.4), rho=0.95, centre=1.2)


@pytest.mark.parametrize("size", [(17, 23), (37, 41), (64, 64), (2, 2)])
def test_forward_matches_oracle_float64(size):
    tokens = random_tokens(2, 40, 3, seed=sum(size))
    out = render_reference(tokens, *size)
    ref = dense_oracle(tokens, *size)
    assert out.shape == (2, 3, *size) and out.dtype == torch.float64 and out.is_contiguous()
    assert ref.abs().max() > 0.1  # the map is not empty
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_forward_float32_and_dtype_follows_tokens():
    tokens = random_tokens(3, 50, 4, seed=1)
    out = render(tokens.float(), (33, 29))
    assert out.dtype == torch.float32
    assert rel_err(out, dense_oracle(tokens.float(), 33, 29)) < 1e-5


def test_single_token_values_by_hand():
    # one token at a pixel centre, rho = 0.5: check three pixels against the formula evaluated by hand
    sx, sy, rho = 0.3, 0.2, 0.5
    tokens = torch.tensor([[[sx, sy, rho, 0.0, 0.0, 2.0]]], dtype=torch.float64)
    out = render_reference(tokens, 5, 5)[0, 0]  # pixel centres -1, -0.5, 0, 0.5, 1
    assert out[2, 2].item() == pytest.approx(2.0)
    ux, uy = 0.5 / sx, -0.5 / sy  # pixel (row 1, col 3): x = 0.5, y = -0.5
    expected = 2.0 * math.exp(-(ux**2 - 2 * rho * ux * uy + uy**2) / (2 * (1 - rho**2)))
    assert out[1, 3].item() == pytest.approx(expected, rel=1e-12)
    # the box is |dx| <= 0.9, |dy| <= 0.6: rows 0 and 4 and columns 0 and 4 (|d| = 1) are cut
    # even though the Gaussian is not 0 there
    assert out[0].abs().max().item() == 0.0 and out[4].abs().max().item() == 0.0
    assert out[:, 0].abs().max().item() == 0.0 and out[:, 4].abs().max().item() == 0.0
    assert out[1:4, 1:4].abs().min().item() > 0.0


def test_uncovered_pixels_are_zero_and_far_tokens_vanish():
    tokens = torch.tensor([[[0.01, 0.01, 0.0, 5.0, 5.0, 1.0], [0.05, 0.05, 0.0, -0.9, -0.9, 1.0]]], dtype=torch.float64)
    out = render_reference(tokens, 32, 32)
    assert out[0, 0, :8, :8].sum() > 0
    assert out[0, 0, 8:, :].abs().max() == 0 and out[0, 0, :, 8:].abs().max() == 0


def test_gradcheck_float64():
    tokens = random_tokens(1, 4, 2, sigma=(0.15, 0.6), seed=3)
    tokens[0, :, 2] = torch.tensor([0.95, -0.95, 0.3, -0.6], dtype=torch.float64)
    tokens.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: render_reference(t, 9, 13), (tokens,), eps=1e-6, atol=1e-7)


def test_gradients_match_oracle_autograd():
    tokens = random_tokens(2, 30, 5, seed=4)
    a = tokens.clone().requires_grad_()
    b = tokens.clone().requires_grad_()
    weight = torch.randn(2, 5, 21, 19, dtype=torch.float64)
    (render_reference(a, 21, 19) * weight).sum().backward()
    (dense_oracle(b, 21, 19) * weight).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_chunked_and_checkpointed_path_matches(monkeypatch):
    tokens = random_tokens(2, 60, 3, seed=5)
    a = tokens.clone().requires_grad_()
    out_one = render_reference(a, 40, 40)
    out_one.square().sum().backward()
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1)  # one tile per chunk, under checkpointing
    b = tokens.clone().requires_grad_()
    out_many = render_reference(b, 40, 40)
    out_many.square().sum().backward()
    torch.testing.assert_close(out_many, out_one, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)


def test_render_validates_input():
    with pytest.raises(ValueError, match="B, N, 5 \\+ C"):
        render(torch.zeros(4, 6), 8)
    with pytest.raises(ValueError, match="B, N, 5 \\+ C"):
        render(torch.zeros(1, 4, 5), 8)
    with pytest.raises(TypeError, match="floating point"):
        render(torch.zeros(1, 4, 6, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="at least 2x2"):
        render(torch.zeros(1, 4, 6), (1, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        render([[0.0] * 6], 8)


def test_render_cpu_dispatches_to_reference_and_accepts_views():
    tokens = random_tokens(4, 20, 3, seed=6, dtype=torch.float32)
    view = tokens.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not view.is_contiguous()
    torch.testing.assert_close(render(view, (16, 24)), render_reference(tokens, 16, 24), rtol=0, atol=0)
    assert splat_cuda.GEOMETRY_DIM == 5


@pytest.mark.slow
@pytest.mark.parametrize("batch,num,channels,size", [(64, 256, 32, 64), (1, 4096, 32, 256)])
def test_issue_sizes_forward_backward(batch, num, channels, size):
    """The two sizes the issue names run forward+backward on CPU; spot-check against the oracle."""
    cell = (2.0 / 3.0) / num**0.5  # about the sigma of a GPSToken partition cell
    tokens = random_tokens(batch, num, channels, sigma=(0.5 * cell, 2 * cell), rho=0.9, centre=1.0,
                           dtype=torch.float32).requires_grad_()
    out = render(tokens, size)
    out.square().mean().backward()
    assert torch.isfinite(tokens.grad).all()
    ref = dense_oracle(tokens[:1, :256].detach(), size, size)
    assert rel_err(render(tokens[:1, :256].detach(), size), ref) < 1e-5

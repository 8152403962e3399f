"""Random GPS-tokens and a relative error, shared by the reference-renderer and CUDA-renderer tests."""
from __future__ import annotations

import torch


def random_tokens(batch, num, channels, *, sigma, rho, centre, seed=0, dtype=torch.float64, device="cpu"):
    """Log-uniform sigma in `sigma`, uniform rho in (-rho, rho), centres uniform in (-centre, centre) (partly
    outside the map when centre > 1), N(0, 1) features; drawn in float32 on the CPU from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = torch.log(torch.tensor(sigma[0])), torch.log(torch.tensor(sigma[1]))
    s = torch.exp(lo + (hi - lo) * torch.rand(batch, num, 2, generator=gen))
    r = (2 * torch.rand(batch, num, 1, generator=gen) - 1) * rho
    mu = (2 * torch.rand(batch, num, 2, generator=gen) - 1) * centre
    f = torch.randn(batch, num, channels, generator=gen)
    return torch.cat([s, r, mu, f], -1).to(dtype=dtype, device=device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of `a` against `b`, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()

"""Samplers of the linear-path flow: Euler and Heun ODE, the released Euler-Maruyama SDE, guidance, noise.

Conventions: noise at t = 0, data at t = 1, a velocity function `velocity(x, t) -> v` with x (B, ...) and
one Python float t per call (all rows share the time of a step).

The SDE of the release (SiT's "SBDM" diffusion on the Linear path)
----------------------------------------------------------------
With x_t = t x1 + (1 - t) x0 (x1 data, x0 ~ N(0, I)) and the velocity v(x, t) = E[x1 - x0 | x_t = x]:
    E[x1 | x] = x + (1 - t) v,   E[x0 | x] = x - t v,   score  s(x, t) = -E[x0 | x] / (1 - t) = (t v - x) / (1 - t).
The release integrates  dx = [v + w(t) s] dt + sqrt(2 w(t)) dW  with the SBDM diffusion
    w(t) = norm * ((1 - t)^2 / t + (1 - t)) = norm * (1 - t) / t,
so the drift is  v + w s = v + norm * (t v - x) / t = v + norm * (v - x / t)  and the noise variance per step
is 2 norm (1 - t) / t * dt. It steps Euler-Maruyama on `linspace(t0, 1 - last_step_size, num_steps)` (t0 = 1e-3;
the diffusion is infinite at 0) and ends with one noiseless "mean" step of size `last_step_size` from
1 - last_step_size: `num_steps` network evaluations in all.
The released code evaluates the network twice per step (once for v in the drift and once inside the score),
both on the same (x, t), so both give the same v: computing the score from that one v is the same process,
not an approximation. Guidance (below) acts on v before the score is formed, as in the release.

Classifier-free guidance
------------------------
`v = v_uncond + scale * (v_cond - v_uncond)` on every channel, and only for guidance_low <= t <= guidance_high.
Inside the interval a step runs one network call on 2B rows (conditional rows, then the same inputs with the
null label); outside it one call on the B conditional rows. At the released setting (250 SDE evaluations,
interval [0.2, 1]) that is 250 + 198 = 448 rows per image (the release runs ~1,000). `GuidedVelocity.rows`
counts them.

Noise
-----
`RowNoise` draws every row's Gaussians from that row's own generator, so a sample depends on its seed only, not
on the batch it shares or the number of processes; `sample_seeds(base_seed, indices)` derives the per-sample
seeds from global sample indices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
import torch

from .config import SamplerConfig

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


#################################################################################
#                                    Noise                                      #
#################################################################################

def sample_seeds(base_seed: int, indices: Sequence[int]) -> list[int]:
    """Well-mixed 63-bit seeds, one per global sample index (independent of batching and of the GPU count)."""
    return [int(np.random.SeedSequence([base_seed, int(index)]).generate_state(2, np.uint64)[0] >> np.uint64(1))
            for index in indices]


class RowNoise:
    """Standard normal noise drawn row by row, each row from its own `torch.Generator`."""

    def __init__(self, generators: Sequence[torch.Generator]):
        if not generators:
            raise ValueError("RowNoise needs at least one generator")
        self.generators = list(generators)

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], device: torch.device | str = "cpu") -> "RowNoise":
        return cls([torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds])

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], *, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(rows, *shape) noise; row i comes from generator i (drawn on the generators' device)."""
        rows = [torch.randn(tuple(shape), generator=g, device=g.device, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device if device is not None else rows[0].device)

    def like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self):
            raise ValueError(f"RowNoise holds {len(self)} generators for a batch of {x.shape[0]} rows")
        return self.randn(x.shape[1:], device=x.device, dtype=x.dtype)


Noise = Union[RowNoise, torch.Generator, None]


def gaussian_like(x: torch.Tensor, noise: Noise) -> torch.Tensor:
    """N(0, I) noise shaped like x: per row (`RowNoise`), from one generator, or from the global RNG (None)."""
    if isinstance(noise, RowNoise):
        return noise.like(x)
    return torch.randn(x.shape, generator=noise, device=x.device, dtype=x.dtype)


#################################################################################
#                         Classifier-free guidance                              #
#################################################################################

@dataclass(frozen=True)
class Guidance:
    """Guidance scale on all channels, applied for low <= t <= high (1.0 = no guidance)."""

    scale: float = 1.0
    low: float = 0.0
    high: float = 1.0

    def active(self, t: float) -> bool:
        return self.scale != 1.0 and self.low <= t <= self.high


class GuidedVelocity:
    """The velocity function of a class-conditional model with guidance; counts network calls and rows.

    `model(x, t, y, layout)` as `FlowTransformer.forward` (a layout only for a texture model). One network
    call per evaluation: on the B conditional rows, plus B unconditional rows only where guidance is active.
    """

    def __init__(self, model: Callable[..., torch.Tensor], labels: torch.Tensor,
                 layout: torch.Tensor | None = None, guidance: Guidance = Guidance(), null_class: int | None = None):
        self.model = model
        self.labels = labels
        self.layout = layout
        self.guidance = guidance
        self.null_class = model.null_class if null_class is None else null_class
        self.calls = 0
        self.rows = 0

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        if x.shape[0] != self.labels.shape[0]:
            raise ValueError(f"GuidedVelocity: x has {x.shape[0]} rows for {self.labels.shape[0]} labels")
        guided = self.guidance.active(t)
        labels, layout, inputs = self.labels, self.layout, x
        if guided:
            inputs = torch.cat([x, x])
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
            layout = None if layout is None else torch.cat([layout, layout])
        t_rows = torch.full((inputs.shape[0],), t, dtype=torch.float32, device=x.device)
        v = self.model(inputs, t_rows, labels, layout) if layout is not None else self.model(inputs, t_rows, labels)
        self.calls += 1
        self.rows += inputs.shape[0]
        if not guided:
            return v
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + self.guidance.scale * (v_cond - v_uncond)


#################################################################################
#                                  Samplers                                     #
#################################################################################

def time_grid(t0: float, t1: float, num_points: int) -> list[float]:
    """`num_points` equally spaced times from t0 to t1, computed in float32 as the release does."""
    return torch.linspace(t0, t1, num_points, dtype=torch.float32).tolist()


def euler_ode(velocity: VelocityFn, x: torch.Tensor, num_steps: int = 50, t0: float = 0.0,
              t1: float = 1.0) -> torch.Tensor:
    """Explicit Euler on dx/dt = v from t0 to t1: `num_steps` evaluations."""
    times = time_grid(t0, t1, num_steps + 1)
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * velocity(x, t)
    return x


def heun_ode(velocity: VelocityFn, x: torch.Tensor, num_steps: int = 50, t0: float = 0.0,
             t1: float = 1.0) -> torch.Tensor:
    """Heun's second-order method (trapezoidal predictor-corrector): 2 evaluations per step."""
    times = time_grid(t0, t1, num_steps + 1)
    for t, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t
        v = velocity(x, t)
        x_pred = x + dt * v
        x = x + 0.5 * dt * (v + velocity(x_pred, t_next))
    return x


def sde_drift(v: torch.Tensor, x: torch.Tensor, t: float, diffusion_norm: float = 1.0) -> torch.Tensor:
    """Drift of the released SDE from one velocity: v + w(t) score = v + norm * (v - x / t)."""
    return v + diffusion_norm * (v - x / t)


def sde_diffusion(t: float, diffusion_norm: float = 1.0) -> float:
    """The SBDM diffusion w(t) = norm * (1 - t) / t; the noise variance per step is 2 w(t) dt."""
    return diffusion_norm * (1.0 - t) / t


def euler_maruyama(velocity: VelocityFn, x: torch.Tensor, noise: Noise = None, num_steps: int = 250,
                   t0: float = 1e-3, last_step_size: float = 0.04, diffusion_norm: float = 1.0) -> torch.Tensor:
    """The released SDE sampler: Euler-Maruyama over `linspace(t0, 1 - last_step_size, num_steps)` and a final
    mean step; `num_steps` velocity evaluations, each used for both drift and score."""
    if num_steps < 2:
        raise ValueError(f"euler_maruyama needs num_steps >= 2, got {num_steps}")
    times = time_grid(t0, 1.0 - last_step_size, num_steps)
    dt = times[1] - times[0]
    for t in times[:-1]:
        mean = x + sde_drift(velocity(x, t), x, t, diffusion_norm) * dt
        x = mean + (2.0 * sde_diffusion(t, diffusion_norm) * dt) ** 0.5 * gaussian_like(x, noise)
    t = times[-1]
    return x + sde_drift(velocity(x, t), x, t, diffusion_norm) * last_step_size


def integrate(velocity: VelocityFn, x: torch.Tensor, config: SamplerConfig = SamplerConfig(),
              noise: Noise = None) -> torch.Tensor:
    """Run the sampler that `config.method` names from the initial noise x to a sample."""
    if config.method == "sde":
        return euler_maruyama(velocity, x, noise, config.num_steps, config.sde_t0, config.last_step_size,
                              config.diffusion_norm)
    ode = {"euler": euler_ode, "heun": heun_ode}[config.method]
    return ode(velocity, x, config.num_steps)


@dataclass
class SampleResult:
    samples: torch.Tensor  # (B, N, C) in the flow's (normalised) space
    calls: int             # network calls
    rows: int              # network rows evaluated (sum of batch sizes over calls)


@torch.no_grad()
def generate(model: torch.nn.Module, labels: torch.Tensor, noise: RowNoise, layout: torch.Tensor | None = None,
             config: SamplerConfig = SamplerConfig()) -> SampleResult:
    """Class-conditional samples of a flow transformer (texture model given `layout`, or layout model).

    The initial noise and every SDE noise of row i come from `noise`'s generator i, so the result of a row
    depends only on its seed, label and layout.
    """
    cfg = model.config
    if len(noise) != labels.shape[0]:
        raise ValueError(f"generate: {len(noise)} noise generators for {labels.shape[0]} labels")
    device = next(model.parameters()).device
    num_tokens = layout.shape[1] if layout is not None else cfg.num_tokens
    x = noise.randn((num_tokens, cfg.in_channels), device=device)
    velocity = GuidedVelocity(model, labels.to(device), None if layout is None else layout.to(device),
                              Guidance(config.guidance_scale, config.guidance_low, config.guidance_high))
    samples = integrate(velocity, x, config, noise)
    return SampleResult(samples, velocity.calls, velocity.rows)

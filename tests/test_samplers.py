"""Flow path, loss and samplers: analytic Gaussian toy flows, the released two-evaluation SDE, row counts."""
from __future__ import annotations

import math

import pytest
import torch

from generator.config import SamplerConfig, load_generator_config
from generator.flow import (M128_TOKEN_STATS, channel_constants, interpolate, normalize_tokens, postprocess_tokens,
                            sample_timesteps, velocity_loss)
from generator.official import load_released_generator
from generator.samplers import (Guidance, GuidedVelocity, RowNoise, euler_maruyama, euler_ode, generate,
                                heun_ode, sample_seeds, time_grid)

# Toy data: x1 ~ N(M, S^2) per coordinate. On the linear path x_t ~ N(t M, t^2 S^2 + (1 - t)^2) and the
# exact velocity E[x1 - x0 | x_t] is affine in x_t; the ODE flow map is x_t = t M + sqrt(var_t) x0.
M, S = 1.5, 0.5


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Small tensors on a shared 2-core machine: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    var = t * t * S * S + (1 - t) ** 2
    centred = x - t * M
    e_x1 = M + t * S * S / var * centred
    e_x0 = (1 - t) / var * centred
    return e_x1 - e_x0


def toy_flow(x0: torch.Tensor, t: float) -> torch.Tensor:
    return t * M + math.sqrt(t * t * S * S + (1 - t) ** 2) * x0


def test_ode_solvers_converge_to_exact_flow():
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = toy_flow(x0, 1.0)
    errors = {n: (heun_ode(toy_velocity, x0, n) - exact).abs().max().item() for n in (20, 40)}
    assert errors[40] < 1e-3 and 3.0 < errors[20] / errors[40] < 5.0  # second order
    euler = {n: (euler_ode(toy_velocity, x0, n) - exact).abs().max().item() for n in (50, 100)}
    assert euler[100] < 0.05 and 1.6 < euler[50] / euler[100] < 2.4  # first order


def test_sde_reaches_data_distribution():
    x = torch.randn(20000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = euler_maruyama(toy_velocity, x, torch.Generator().manual_seed(2), num_steps=250)
    assert abs(out.mean().item() - M) < 0.01  # standard error 0.0035
    assert abs(out.std().item() - S) < 0.015  # standard error 0.0025 plus the discretisation's small bias


def released_sde_two_calls(model, z, labels, layout, null_class, noise_rows, other_noise, scale, low, high,
                           num_steps=250, t0=1e-3, last_step_size=0.04):
    """A literal transcription of the released sampler (SiT ICPlan, SBDM diffusion, Euler-Maruyama, mean last
    step, `forward_with_cfg`) on a [cond; uncond] batch: two network evaluations per step. Returns the
    conditional half and the number of network rows it evaluated."""
    b = z.shape[0]
    x = torch.cat([z, z])
    y = torch.cat([labels, torch.full_like(labels, null_class)])
    cond = torch.cat([layout, layout])
    rows = 0

    def forward_with_cfg(x, t):
        nonlocal rows
        if low <= t[0] <= high:
            half = x[:b]
            out = model(torch.cat([half, half]), t, y, cond)
            c, u = out.split(b)
            g = u + scale * (c - u)
            out = torch.cat([g, g])
        else:
            out = model(x, t, y, cond)
        rows += x.shape[0]
        return out

    def sde_drift(x, t):
        tt = t.view(-1, 1, 1)
        drift = forward_with_cfg(x, t)                               # velocity ODE drift
        diffusion = (1 / tt) * (1 - tt) ** 2 + (1 - tt)              # ICPlan.compute_drift()[1], SBDM
        var = (1 - tt) ** 2 - tt * (-1) * (1 - tt)                   # get_score_from_velocity
        score = (tt * forward_with_cfg(x, t) - x) / var
        return drift + diffusion * score, diffusion

    grid = torch.linspace(t0, 1 - last_step_size, num_steps)
    dt = grid[1] - grid[0]
    for ti in grid[:-1]:
        t = torch.ones(2 * b) * ti
        w = torch.cat([noise_rows.like(z), other_noise.like(z)])
        drift, diffusion = sde_drift(x, t)
        x = x + drift * dt + torch.sqrt(2 * diffusion) * w * torch.sqrt(dt)
    t = torch.ones(2 * b) * grid[-1]
    x = x + sde_drift(x, t)[0] * last_step_size
    return x[:b], rows


@pytest.fixture(scope="module")
def tiny(official_dir):
    return load_released_generator(official_dir / "tiny_sit.safetensors", load_generator_config("sit_tiny").model)


def _inputs(b=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (b,), generator=g)
    layout = 0.3 * torch.randn(b, 16, 5, generator=g)
    return labels, layout


def _compare_with_release(tiny, num_steps):
    labels, layout = _inputs()
    seeds = [11, 12]
    z = RowNoise.from_seeds([1, 2]).randn((16, 13))
    velocity = GuidedVelocity(tiny, labels, layout, Guidance(1.5, 0.2, 1.0))
    with torch.no_grad():
        ours = euler_maruyama(velocity, z.clone(), RowNoise.from_seeds(seeds), num_steps)
        theirs, their_rows = released_sde_two_calls(tiny, z.clone(), labels, layout, 10, RowNoise.from_seeds(seeds),
                                                    RowNoise.from_seeds([98, 99]), 1.5, 0.2, 1.0, num_steps)
    assert torch.isfinite(ours).all() and ours.abs().max() > 0.1
    assert (ours - theirs).abs().max() < 1e-4
    guided_points = sum(t >= 0.2 for t in time_grid(1e-3, 0.96, num_steps))
    assert velocity.calls == num_steps and velocity.rows == 2 * (num_steps + guided_points)
    assert their_rows == 2 * 2 * 2 * num_steps  # two evaluations per step of the [cond; uncond] batch
    return velocity.rows // 2, their_rows // 2


def test_one_call_sde_equals_released_two_call_sde(tiny):
    """Same initial noise and per-step noise: the released process and ours agree to float rounding, with
    448 network rows per image instead of 1,000 at the released setting."""
    assert _compare_with_release(tiny, 40)[0] < 2 * 40
    assert _compare_with_release(tiny, 250) == (448, 1000)


class CountingStub(torch.nn.Module):
    """A stand-in network (velocity = -x) with the interface `GuidedVelocity` and `generate` use."""

    null_class = 10

    def __init__(self):
        super().__init__()
        self.config = load_generator_config("sit_tiny").model
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, y, layout=None):
        return -self.weight * x


def test_row_count_at_released_setting():
    config = SamplerConfig()
    assert (config.method, config.num_steps, config.guidance_scale, config.guidance_low) == ("sde", 250, 1.5, 0.2)
    labels, layout = _inputs(b=4)
    stub = CountingStub()
    result = generate(stub, labels, RowNoise.from_seeds(range(4)), layout, config)
    guided_points = sum(t >= 0.2 for t in time_grid(1e-3, 0.96, 250))
    assert result.calls == 250 and result.rows == 4 * (250 + guided_points) == 4 * 448 and 448 <= 460
    unguided = generate(stub, labels, RowNoise.from_seeds(range(4)), layout, SamplerConfig(guidance_scale=1.0))
    assert unguided.rows == 4 * 250
    heun = generate(stub, labels, RowNoise.from_seeds(range(4)), layout,
                    SamplerConfig(method="heun", num_steps=10, guidance_scale=1.5, guidance_low=0.5))
    assert heun.calls == 20 and heun.rows == 4 * (20 + 11)  # guided at t >= 0.5: 6 first + 5 second stages


def test_rows_do_not_depend_on_batching(tiny):
    labels, layout = _inputs(b=3)
    seeds = sample_seeds(23, [0, 1, 2])
    config = SamplerConfig(num_steps=12)
    together = generate(tiny, labels, RowNoise.from_seeds(seeds), layout, config).samples
    for i in range(3):
        alone = generate(tiny, labels[i:i + 1], RowNoise.from_seeds(seeds[i:i + 1]), layout[i:i + 1], config)
        assert (alone.samples[0] - together[i]).abs().max() < 1e-5
    assert len(set(seeds)) == 3 and sample_seeds(23, [1]) == seeds[1:2] and sample_seeds(24, [1]) != seeds[1:2]
    with pytest.raises(ValueError, match="2 noise generators for 3 labels"):
        generate(tiny, labels, RowNoise.from_seeds(seeds[:2]), layout, config)


def test_path_loss_and_timesteps():
    g = torch.Generator().manual_seed(0)
    data, noise = torch.randn(8, 4, 3, generator=g), torch.randn(8, 4, 3, generator=g)
    assert torch.equal(interpolate(data, noise, torch.zeros(8)), noise)
    assert torch.equal(interpolate(data, noise, torch.ones(8)), data)
    # A single data point x1: the exact velocity is (x1 - x_t) / (1 - t), so the oracle's loss is ~0.
    x1 = torch.randn(1, 4, 3, generator=g).expand(8, 4, 3)
    t = torch.rand(8, generator=g) * 0.9
    oracle = lambda x, t: (x1 - x) / (1 - t.view(-1, 1, 1))  # noqa: E731
    assert velocity_loss(oracle, x1, t=t, noise=noise).max() < 1e-10
    zero = velocity_loss(lambda x, t: torch.zeros_like(x), data, t=t, noise=noise)
    assert torch.allclose(zero, ((data - noise) ** 2).mean(dim=(1, 2)))
    torch.manual_seed(0)
    uniform = sample_timesteps(20000)
    logit = sample_timesteps(20000, "logit_normal", mean=1.0)
    assert abs(uniform.mean() - 0.5) < 0.01 and abs(logit.median() - torch.sigmoid(torch.tensor(1.0))) < 0.01
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_timesteps(4, "cosine")


def test_channel_constants_are_made_once_per_dtype():
    like64, like32 = torch.zeros(1, dtype=torch.float64), torch.zeros(3)
    first = channel_constants([0.1, 2.5], like64)
    assert first.dtype == torch.float64 and first.tolist() == [0.1, 2.5]
    assert channel_constants((0.1, 2.5), like64) is first                      # no new host-to-device copy
    assert channel_constants((0.1, 2.5), like32).dtype == torch.float32
    assert channel_constants((0.1, 2.6), like64).tolist() == [0.1, 2.6]


def test_postprocess_is_released_inverse_of_normalisation():
    assert len(M128_TOKEN_STATS.mean) == len(M128_TOKEN_STATS.std) == 21
    assert M128_TOKEN_STATS.mean[5] == 1.8017 and M128_TOKEN_STATS.std[2] == 0.2533
    g = torch.Generator().manual_seed(0)
    layout = torch.rand(2, 128, 5, generator=g) * 0.5 + 0.1
    tokens = torch.cat([layout + 0.01 * torch.randn(2, 128, 5, generator=g), torch.randn(2, 128, 16, generator=g)], -1)
    assert torch.allclose(postprocess_tokens(normalize_tokens(tokens, layout), layout), tokens, atol=1e-5)
    wild = postprocess_tokens(100 * torch.randn(2, 128, 21, generator=g), layout)
    assert wild[..., :2].min() >= 1e-5 and wild[..., :2].max() <= 1 - 1e-5
    assert wild[..., 2].abs().max() <= 0.99999 and wild[..., 3:5].abs().max() > 1  # mu is not clamped
    with pytest.raises(ValueError, match="layout must be"):
        postprocess_tokens(tokens, layout[:, :64])

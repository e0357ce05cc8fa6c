"""The SDE sampler against exact Gaussian marginals (on SD3's and FLUX's grids); log-probs and KL
against torch.distributions."""

import math

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from tempflow_core.algorithm.schedule import make_schedule
from tempflow_core.algorithm.sde import gaussian_kl, gaussian_log_prob, sde_log_prob, sde_step

MU, STD = 1.5, 0.5  # 1-D Gaussian data


def gaussian_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """Exact flow-matching velocity E[eps - x0 | x_t = x] for x0 ~ N(MU, STD^2), x_t = (1-t) x0 + t eps."""
    var = (1 - t) ** 2 * STD**2 + t**2
    cov = t - (1 - t) * STD**2
    return -MU + cov / var * (x - (1 - t) * MU)


SD3_GRID = {"shift": 3.0, "noise_level": 0.7}
# FLUX.1-dev at 512 px: (512 / 16)^2 = 1024 image tokens -> mu; a = 0.9
FLUX_GRID = {"noise_level": 0.9, "mu": calculate_shift(1024, 256, 4096, 0.5, 1.15)}


def run_sde(num_steps: int, n: int = 40_000, seed: int = 0, grid: dict = SD3_GRID):
    s = make_schedule(num_steps, **grid)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, dtype=torch.float64, generator=g)
    sig, ssig = s.sigmas.tolist(), s.sde_sigma().tolist()
    marg = []
    for i in range(num_steps):
        v = gaussian_velocity(x, sig[i])
        x = sde_step(x, v, sig[i], sig[i + 1], ssig[i], torch.randn(x.shape, dtype=torch.float64, generator=g)).next_sample
        marg.append((sig[i + 1], x.mean().item(), x.std().item()))
    return x, marg


@pytest.mark.parametrize("grid", [SD3_GRID, FLUX_GRID], ids=["sd3", "flux"])
def test_sde_reproduces_data_distribution_and_intermediate_marginals(grid):
    x, marg = run_sde(300, grid=grid)
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.std().item() - STD) / STD < 0.03
    for t, m, sd in marg[50::50]:  # the first step is inflated by the sigma_max stand-in at t = 1
        exact_m = (1 - t) * MU
        exact_sd = math.sqrt((1 - t) ** 2 * STD**2 + t**2)
        assert abs(m - exact_m) < 0.03, (t, m, exact_m)
        assert abs(sd - exact_sd) / exact_sd < 0.03, (t, sd, exact_sd)


def test_discretisation_error_shrinks_with_more_steps():
    errs = [abs(run_sde(T, n=20_000, seed=1)[0].std().item() - STD) for T in (10, 50, 300)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[0] > 0.03  # coarse grids are visibly off (measured: ~0.08 at 10 steps)


def test_log_prob_matches_torch_normal():
    g = torch.Generator().manual_seed(3)
    x, v, nxt = (torch.randn(4, 3, 5, 5, generator=g) for _ in range(3))
    lp, mean, std = sde_log_prob(nxt, x, v, 0.8, 0.7, 1.2)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(nxt).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lp, ref)
    out = sde_step(x, v, 0.8, 0.7, 1.2, torch.randn(4, 3, 5, 5, generator=g))
    torch.testing.assert_close(out.log_prob, torch.distributions.Normal(out.mean, out.std.expand_as(out.mean))
                               .log_prob(out.next_sample).mean(dim=(1, 2, 3)))
    # transition mean and std are those of paper eq. 5
    t, dt, s = 0.8, -0.1, 1.2
    torch.testing.assert_close(mean, x + (v + s**2 / (2 * t) * (x + (1 - t) * v)) * dt)
    torch.testing.assert_close(std.flatten(), torch.full((4,), s * math.sqrt(0.1)))


def test_kl_matches_torch_and_monte_carlo():
    g = torch.Generator().manual_seed(4)
    m1, m2 = torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, 2, 3, 3, generator=g)
    std = torch.full((2, 1, 1, 1), 0.7)
    kl = gaussian_kl(m1, m2, std)
    p, q = torch.distributions.Normal(m1, std.expand_as(m1)), torch.distributions.Normal(m2, std.expand_as(m2))
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(p, q).mean(dim=(1, 2, 3)))
    samples = p.sample((20_000,))
    mc = (p.log_prob(samples) - q.log_prob(samples)).mean(0).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kl, mc, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("t", [0.9, 0.5, 0.1])
def test_kl_equals_velocity_form_of_eq6(t):
    """KL = dt/2 (s(1-t)/(2t) + 1/s)^2 ||v - v_ref||^2 (per dim), paper eq. 6."""
    from tempflow_core.algorithm.sde import sde_mean_std

    g = torch.Generator().manual_seed(5)
    x, v, vr = (torch.randn(3, 8, dtype=torch.float64, generator=g) for _ in range(3))
    dt, s = 0.05, 0.7 * math.sqrt(t / (1 - t))
    m1, std = sde_mean_std(x, v, t, t - dt, s)
    m2, _ = sde_mean_std(x, vr, t, t - dt, s)
    expected = dt / 2 * (s * (1 - t) / (2 * t) + 1 / s) ** 2 * ((v - vr) ** 2).mean(1)
    torch.testing.assert_close(gaussian_kl(m1, m2, std), expected)

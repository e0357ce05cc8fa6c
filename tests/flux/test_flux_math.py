"""The SDE math on FLUX's grid (dynamic shift, a = 0.9). The marginals check runs on this grid in
tests/algorithm/test_sde.py (parametrised over SD3 and FLUX)."""

import math

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from tempflow_core.algorithm.schedule import make_schedule
from tempflow_core.algorithm.sde import gaussian_kl, sde_log_prob, sde_mean_std, sde_step

MU_512 = calculate_shift(1024, 256, 4096, 0.5, 1.15)  # FLUX.1-dev at 512 px: (512 / 16)^2 = 1024 tokens


def test_flux_grid_is_shifted_linspace():
    s = make_schedule(4, mu=MU_512)
    base = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    e = math.exp(MU_512)
    torch.testing.assert_close(s.sigmas[:-1], e / (e + (1 / base - 1)))  # exponential time shift
    assert s.sigmas[-1] == 0 and s.noise_level == 0.7  # make_schedule's own default; FLUX passes 0.9


@pytest.mark.parametrize("i", [0, 3, 8])
def test_log_prob_of_a_flux_step_matches_torch_normal(i):
    s = make_schedule(10, noise_level=0.9, mu=MU_512)
    t, t_next, st = float(s.sigmas[i]), float(s.sigmas[i + 1]), float(s.sde_sigma()[i])
    g = torch.Generator().manual_seed(i)
    x, v = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    out = sde_step(x, v, t, t_next, st, torch.randn(4, 16, 8, 8, generator=g))
    ref = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean)).log_prob(out.next_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, ref)
    lp, mean, std = sde_log_prob(out.next_sample, x, v, t, t_next, st)
    torch.testing.assert_close(lp, out.log_prob)
    dt = t_next - t  # paper eq. 5, s_t = 0.9 sqrt(t / (1 - t)) on FLUX's grid
    torch.testing.assert_close(mean, x + (v + st**2 / (2 * t) * (x + (1 - t) * v)) * dt)
    torch.testing.assert_close(std.flatten(), torch.full((4,), st * math.sqrt(-dt)))
    # KL to a reference velocity: paper eq. 6
    vr = torch.randn(4, 16, 8, 8, generator=g)
    m2, _ = sde_mean_std(x, vr, t, t_next, st)
    expected = -dt / 2 * (st * (1 - t) / (2 * t) + 1 / st) ** 2 * ((v - vr) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_kl(mean, m2, std), expected, rtol=1e-4, atol=1e-6)

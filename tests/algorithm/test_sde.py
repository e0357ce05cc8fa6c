"""The SDE sampler against exact Gaussian marginals (on SD3's and FLUX's grids); log-probs and KL
against torch.distributions."""

import math

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from tempflow_core.algorithm.schedule import make_schedule
from tempflow_core.algorithm.sde import gaussian_kl, sde_log_prob, sde_step

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


def point_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """Exact velocity when the data is one point MU: x_t = (1-t) MU + t eps, so v = (x - MU) / t."""
    return (x - MU) / t


@pytest.mark.parametrize("grid", [SD3_GRID, FLUX_GRID], ids=["sd3", "flux"])
def test_cps_preserves_the_coefficients_of_data_and_noise_on_a_coarse_grid(grid):
    """Where the model's predicted data is exact (one data point), every CPS state is (1-t) x0 +
    t * unit noise, at every step of a 6-step grid: the marginals are the forward process's
    exactly. Flow-GRPO's SDE on the same grid is not (its discretisation leaves noise)."""
    from dataclasses import replace

    for kind, tol_ok in (("cps", True), ("flow_grpo", False)):
        s = replace(make_schedule(6, **grid), sde_type=kind)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40_000, 1, dtype=torch.float64, generator=g)
        sig, p = s.sigmas.tolist(), s.sde_sigma().tolist()
        errs = []
        for i in range(5):  # the last step ends at t = 0, where CPS adds no noise
            v = point_velocity(x, sig[i])
            x = sde_step(x, v, sig[i], sig[i + 1], p[i], torch.randn(x.shape, dtype=torch.float64, generator=g),
                         kind).next_sample
            t = sig[i + 1]
            errs.append(max(abs(x.mean().item() - (1 - t) * MU), abs(x.std().item() - t) / t))
        assert (max(errs) < 0.02) == tol_ok, (kind, errs)


def test_cps_with_the_posterior_mean_does_not_converge_to_the_data_as_steps_grow():
    """A property to know before choosing CPS: on Gaussian data with the exact (posterior-mean)
    velocity, each CPS step replaces part of the posterior spread with fresh noise of std
    t' sin(a pi / 2), which does not shrink with the step size, so its final std stays below the
    data's however fine the grid (measured: 0.42 at 300 steps against 0.50), while the ODE and
    Flow-GRPO's SDE converge (0.498). On the coarse grids of training it sits near the ODE's:
    0.25 / 0.26 (ODE) at 6 steps."""
    from dataclasses import replace

    def final_std(kind: str, T: int) -> float:
        s = replace(make_schedule(T), sde_type=kind)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(20_000, 1, dtype=torch.float64, generator=g)
        sig, p = s.sigmas.tolist(), s.sde_sigma().tolist()
        for i in range(T):
            x = sde_step(x, gaussian_velocity(x, sig[i]), sig[i], sig[i + 1], p[i],
                         torch.randn(x.shape, dtype=torch.float64, generator=g), kind).next_sample
        return x.std().item()

    assert STD - final_std("cps", 300) > 0.05
    assert abs(final_std("flow_grpo", 300) - STD) < 0.01
    assert abs(final_std("cps", 6) - 0.26) < 0.03  # the ODE's at 6 steps: 0.264


def test_cps_is_far_from_the_sde_step_and_its_log_prob_is_gaussian():
    """CPS is another transition than eq. 5 (same input, other mean and std); its log-prob is the
    Gaussian's around its own mean."""
    from tempflow_core.algorithm.sde import sde_mean_std

    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    m_sde, s_sde = sde_mean_std(x, v, 0.6, 0.45, 0.7 * math.sqrt(0.6 / 0.4))
    a = math.sin(0.7 * math.pi / 2)
    m_cps, s_cps = sde_mean_std(x, v, 0.6, 0.45, a, "cps")
    x0, e = x - 0.6 * v, x + 0.4 * v  # predicted data and noise
    torch.testing.assert_close(m_cps, 0.55 * x0 + math.sqrt(0.45**2 - (0.45 * a) ** 2) * e)
    assert s_cps.flatten()[0].item() == pytest.approx(0.45 * a) and not torch.allclose(m_cps, m_sde)
    nxt = m_cps + s_cps * torch.randn(x.shape, generator=g)
    lp, _, _ = sde_log_prob(nxt, x, v, 0.6, 0.45, a, "cps")
    want = torch.distributions.Normal(m_cps, s_cps.expand_as(m_cps)).log_prob(nxt).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lp, want)

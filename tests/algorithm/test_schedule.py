"""Schedule, ODE step and noise-aware weights against diffusers and the paper's algebra."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tempflow_core.algorithm.schedule import Schedule, make_schedule
from tempflow_core.algorithm.sde import ode_step, sde_step


def test_sigmas_and_timesteps_match_diffusers_sd3():
    s = make_schedule(10, shift=3.0)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    torch.testing.assert_close(s.sigmas.float(), ref.sigmas.float())
    torch.testing.assert_close(s.timesteps, ref.timesteps.float())
    assert s.sigmas[0] == 1.0 and s.sigmas[-1] == 0.0
    # shift 3 bends the grid toward the noisy end: t = 3u / (1 + 2u) on a uniform u grid
    # from 1 down to the shifted sigma_min (diffusers shifts 1/1000 once at init)
    u_min = 3e-3 / (1 + 2e-3)
    u = torch.linspace(1.0, u_min, 10, dtype=torch.float64)
    torch.testing.assert_close(s.sigmas[:-1], 3 * u / (1 + 2 * u))


def test_ode_step_matches_diffusers_euler_step():
    s = make_schedule(8, shift=3.0)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i in range(8):
        v = torch.randn(2, 4, 8, 8, generator=g)
        ref._step_index = i  # diffusers keeps a hidden counter; we pass t explicitly instead
        expected = ref.step(v, ref.timesteps[i], x, return_dict=False)[0]
        got = ode_step(x, v, float(s.sigmas[i]), float(s.sigmas[i + 1]))
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        x = expected


def test_sde_with_vanishing_noise_is_the_ode_step():
    s = make_schedule(6)
    x, v = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    out = sde_step(x, v, float(s.sigmas[2]), float(s.sigmas[3]), 1e-8, torch.randn(3, 4, 4, 4))
    torch.testing.assert_close(out.next_sample, ode_step(x, v, float(s.sigmas[2]), float(s.sigmas[3])),
                               rtol=1e-5, atol=1e-5)


def test_noise_level_uses_sigma_max_at_t1_and_scale_is_s_sqrt_dt():
    s = make_schedule(10, shift=3.0, noise_level=0.7)
    sig = s.sigmas
    expected0 = 0.7 * torch.sqrt(sig[0] / (1 - sig[1]))
    torch.testing.assert_close(s.sde_sigma()[0], expected0)
    torch.testing.assert_close(s.sde_sigma()[4], 0.7 * torch.sqrt(sig[4] / (1 - sig[4])))
    torch.testing.assert_close(s.step_std(), s.sde_sigma() * torch.sqrt(sig[:-1] - sig[1:]))


def test_weights_mean_one_over_trained_steps_and_larger_early_with_shift3():
    s = make_schedule(10, shift=3.0)
    w = s.step_weights()  # default: the trainable steps 0..T-2
    assert w.shape == (9,) and abs(float(w.mean()) - 1.0) < 1e-12
    assert w[0] > 1.0 and w[1] > w[5] > w[8]
    sub = s.step_weights([2, 5, 7])
    assert abs(float(sub.mean()) - 1.0) < 1e-12
    torch.testing.assert_close(sub / sub[0], s.step_std()[[2, 5, 7]] / s.step_std()[2])
    const = s.step_weights([2, 5], norm="constant", constant=2.25)
    torch.testing.assert_close(const, 2.25 * s.step_std()[[2, 5]])


def test_reweighted_scale_term_is_proportional_to_dt():
    """Paper eq. 22-23: w_k * sqrt(dt (1-t)/t) is proportional to dt (t < 1 steps);
    with shift 1 every step then contributes equally."""
    for shift in (1.0, 3.0):
        s = make_schedule(12, shift=shift)
        dt = (s.sigmas[:-1] - s.sigmas[1:])[1:]
        prod = (s.step_weights(list(range(12))) * s.scale_term())[1:]
        ratio = prod / dt
        torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-9, atol=0)
        if shift == 1.0:  # uniform dt (all but the final jump from sigma_min to 0): equal shares
            torch.testing.assert_close(prod[:-1], prod[0].expand_as(prod[:-1]), rtol=1e-5, atol=0)  # float32 grid
    # without reweighting, late steps dominate under shift 3 (the mismatch of Figure 4)
    s3 = make_schedule(12, shift=3.0)
    assert s3.scale_term()[-1] > 3 * s3.scale_term()[1]


def test_a_schedule_rebuilt_from_stored_sigmas_is_the_same_grid():
    # FLUX's grid (exp(mu) shift on linspace(1, 1/T, T)) and SD3's, through their stored sigmas
    for s in (make_schedule(6, noise_level=0.9, mu=0.8), make_schedule(6, 3.0, 0.7)):
        back = Schedule.from_sigmas(s.sigmas.tolist(), s.noise_level)
        assert torch.equal(back.sigmas, s.sigmas.double()) and back.noise_level == s.noise_level
        torch.testing.assert_close(back.timesteps, s.timesteps)
        torch.testing.assert_close(back.step_std(), s.step_std().double())

"""The flow samplers with the exact velocity field of Gaussian data: the ODE carries N(0, I) to the data
(sample by sample, since the map between Gaussians is known) and the SDEs to the data's mean and covariance
within sampling error; grids, step counts and SiT's intervals."""
import math

import pytest
import torch

from diffusion.flow_paths import Interpolant
from diffusion.flow_samplers import (SDESettings, network_evaluations, ode_adaptive, ode_fixed, ode_interval,
                                     sde_grid, sde_interval, sde_sample, time_grid)

F64 = torch.float64
MEAN = torch.tensor([1.0, -0.5, 0.3], dtype=F64)
COV = torch.tensor([[0.30, 0.10, 0.00], [0.10, 1.20, -0.20], [0.00, -0.20, 0.60]], dtype=F64)


def exact_velocity(path: Interpolant, mean=MEAN, cov=COV):
    """E[u_t | x_t] for x ~ N(mean, cov): alpha' E[x | x_t] + sigma' E[eps | x_t] (float64)."""

    def velocity(x, t, rows=None):
        x = x.to(F64)
        alpha, sigma = path.alpha_sigma(t)
        d_alpha, d_sigma = path.derivatives(t)
        eye = torch.eye(len(mean), dtype=F64)
        covs = alpha[:, None, None] ** 2 * cov + sigma[:, None, None] ** 2 * eye
        centred = x - alpha[:, None] * mean
        solved = torch.linalg.solve(covs, centred.unsqueeze(-1)).squeeze(-1)
        x_hat = mean + alpha[:, None] * (solved @ cov)
        eps_hat = sigma[:, None] * solved
        return (d_alpha[:, None] * x_hat + d_sigma[:, None] * eps_hat).float()

    return velocity


def gaussian_map(path, start, noise):
    """The monotone affine map from the marginal at `start` to the data, for a diagonal covariance."""
    alpha, sigma = (c.item() for c in path.alpha_sigma(torch.tensor([start], dtype=F64)))
    std = torch.tensor([0.5, 1.2, 0.8], dtype=F64)
    marginal_std = (alpha**2 * std**2 + sigma**2).sqrt()
    return MEAN + std * (noise.to(F64) - alpha * MEAN) / marginal_std, std


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
def test_the_ode_maps_noise_to_the_data_sample_by_sample(path):
    flow = Interpolant(path)
    std = torch.tensor([0.5, 1.2, 0.8], dtype=F64)
    velocity = exact_velocity(flow, cov=torch.diag(std**2))
    noise = torch.randn(256, 3, generator=torch.Generator().manual_seed(0))
    start, end = ode_interval(path, "velocity", 1e-3)
    target, _ = gaussian_map(flow, start, noise)
    adaptive = ode_adaptive(velocity, noise, start, end, rtol=1e-6, atol=1e-8)
    tol = 1e-3 if path != "vp" else 3e-3  # vp ends at eps = 1e-3 (SiT), not at the data
    assert (adaptive.double() - target).abs().max() < tol
    steps = 160 if path == "vp" else 40  # vp's velocity is steep near the noise
    heun = ode_fixed(velocity, noise, time_grid(start, end, steps), "heun")
    euler = ode_fixed(velocity, noise, time_grid(start, end, steps), "euler")
    heun_error, euler_error = ((s.double() - target).abs().max().item() for s in (heun, euler))
    assert heun_error < 0.02 and heun_error < 0.2 * euler_error  # second order beats first


def test_the_ode_carries_noise_to_the_data_moments_with_a_full_covariance():
    noise = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(1))
    samples = ode_adaptive(exact_velocity(Interpolant("linear")), noise, 1.0, 0.0, rtol=1e-5, atol=1e-7).double()
    n = len(samples)
    se_mean = (COV.diagonal() / n).sqrt()
    assert ((samples.mean(0) - MEAN).abs() < 4 * se_mean).all()
    assert (samples.T.cov() - COV).abs().max() < 4 * math.sqrt(2 / n) * 1.2


@pytest.mark.parametrize("solver,form", [("euler", "sigma"), ("heun", "sigma"), ("euler", "sbdm"), ("euler", "linear")])
def test_the_sde_carries_noise_to_the_data_moments(solver, form):
    flow = Interpolant("linear")
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(20_000, 3, generator=generator)
    draw = lambda shape: torch.randn(*shape, generator=generator)
    settings = SDESettings(solver=solver, form=form, last_step="mean")
    start, end = sde_interval("linear", "velocity", form, 1e-3, "mean", 0.04)
    samples = sde_sample(exact_velocity(flow), flow, noise, sde_grid(start, end, 100, "mean"), draw, settings).double()
    n = len(samples)
    assert ((samples.mean(0) - MEAN).abs() < 4 * (COV.diagonal() / n).sqrt() + 0.01).all()
    # the noise-free last step from t = 0.04 leaves a bias of order 0.04 in the covariance
    assert (samples.T.cov() - COV).abs().max() < 0.06


def test_a_wrong_score_sign_is_caught_by_the_moments():
    """The SDE test above is sharp: the same SDE with the score term flipped is far off."""
    flow = Interpolant("linear")
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(4000, 3, generator=generator)
    draw = lambda shape: torch.randn(*shape, generator=generator)

    class FlippedScore(Interpolant):
        def score_from_velocity(self, v, x, t):
            return -super().score_from_velocity(v, x, t)

    samples = sde_sample(exact_velocity(flow), FlippedScore("linear"), noise, sde_grid(1.0, 0.04, 100, "mean"),
                         draw).double()
    assert (samples.T.cov() - COV).abs().max() > 0.5


def test_every_draw_goes_through_noise_and_each_row_uses_its_own():
    flow = Interpolant("linear")
    velocity = exact_velocity(flow)
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    rows = [torch.Generator().manual_seed(10 + i) for i in range(5)]

    def per_row(generators):
        return lambda shape: torch.stack([torch.randn(*shape[1:], generator=g) for g in generators])

    grid = sde_grid(1.0, 0.04, 12, "mean")
    batch = sde_sample(velocity, flow, noise, grid, per_row(rows))
    rows_again = [torch.Generator().manual_seed(10 + i) for i in range(5)]
    alone = sde_sample(velocity, flow, noise[3:4], grid, per_row(rows_again[3:4]))
    torch.testing.assert_close(batch[3:4], alone)


def test_grids_step_counts_and_sits_intervals():
    grid = time_grid(1.0, 0.0, 4)
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64))
    shifted = time_grid(1.0, 0.0, 4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and (shifted[1:-1] > grid[1:-1]).all()
    sde = sde_grid(1.0, 0.04, 250, "mean")  # SiT's and REPA's 250 steps: 249 to t = 0.04, then 0
    assert len(sde) == 251 and sde[-2].item() == pytest.approx(0.04) and sde[-1] == 0.0
    assert sde[0] - sde[1] == pytest.approx(0.96 / 249)
    assert sde_interval("linear", "velocity", "sigma", 1e-3, "mean", 0.04) == (1.0, 0.04)
    assert sde_interval("linear", "velocity", "sbdm", 1e-3, "mean", 0.04) == (1 - 1e-3, 0.04)
    assert sde_interval("linear", "noise", "sigma", 1e-3, "none", 0.04) == (1 - 1e-3, 1e-3)
    assert ode_interval("gvp", "score", 1e-3) == (1 - 1e-3, 1e-3)
    assert network_evaluations("ode", "euler", 20) == 20 and network_evaluations("ode", "heun", 10) == 19
    assert network_evaluations("sde", "euler", 250) == 250 and network_evaluations("sde", "heun", 250) == 499
    assert network_evaluations("ode", "adaptive", 10) is None
    with pytest.raises(ValueError, match="steps >= 2"):
        sde_grid(1.0, 0.04, 1, "mean")
    with pytest.raises(ValueError, match="steps >= 1"):
        time_grid(1.0, 0.0, 0)


def test_heun_takes_no_correction_on_its_last_step():
    calls = []

    def velocity(x, t, rows=None):
        calls.append(float(t[0]))
        return torch.zeros_like(x)

    ode_fixed(velocity, torch.zeros(2, 3), time_grid(1.0, 0.0, 5), "heun")
    assert len(calls) == 9 and 0.0 not in calls  # 2 x 5 - 1, the network never sees t = 0

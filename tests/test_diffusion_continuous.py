"""Continuous time for a discrete DiT teacher, and deterministic DDIM on it."""
import numpy as np
import pytest
import torch

from diffusion import create_diffusion
from diffusion.continuous_ddim import ddim_sample, ddim_step, time_grid
from diffusion.continuous_schedule import ContinuousSchedule
from diffusion.schedule import get_beta_schedule


@pytest.fixture(params=["linear", "cosine"])
def schedule_and_betas(request):
    betas = get_beta_schedule(request.param, 1000)
    return ContinuousSchedule(betas), betas


def test_variance_preserving_and_monotone(schedule_and_betas):
    schedule, _ = schedule_and_betas
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(t), atol=1e-12)
    log_snr = schedule.log_snr(t[1:])
    assert torch.all(log_snr[1:] < log_snr[:-1]), "log-SNR must fall strictly with t"
    assert torch.all(alpha[1:] < alpha[:-1])


def test_endpoints_and_integer_steps_are_the_teachers(schedule_and_betas):
    schedule, betas = schedule_and_betas
    alpha_bar = np.cumprod(1 - betas)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert alpha[0] == 1 and sigma[0] == 0  # t = 0 is the data itself
    assert alpha[1] ** 2 == pytest.approx(alpha_bar[-1], rel=1e-9)  # t = 1 is the teacher's last step
    k = torch.arange(1000)
    t = (k + 1).double() / 1000
    alpha, _ = schedule.alpha_sigma(t)
    assert np.allclose(alpha.numpy() ** 2, alpha_bar, rtol=1e-10, atol=0)
    assert torch.equal(schedule.model_timesteps(t), k.float())  # the network sees the exact integer step


def test_between_steps_is_geometric_and_the_network_input_is_clamped():
    betas = get_beta_schedule("linear", 1000)
    schedule = ContinuousSchedule(betas)
    alpha_bar = np.cumprod(1 - betas)
    t = torch.tensor([10.5 / 1000], dtype=torch.float64)  # halfway between steps 9 and 10
    alpha, _ = schedule.alpha_sigma(t)
    assert alpha.item() ** 2 == pytest.approx(np.sqrt(alpha_bar[9] * alpha_bar[10]), rel=1e-12)
    assert schedule.model_timesteps(t).item() == pytest.approx(9.5)
    assert schedule.model_timesteps(torch.tensor([0.0, 0.0004], dtype=torch.float64)).tolist() == [0.0, 0.0]


def test_time_grid_runs_from_one_to_zero():
    assert time_grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        time_grid(0)


def _eps_model(x, t):
    """A fixed nonlinear 'network' eps(x, t)."""
    return torch.tanh(0.7 * x + 0.002 * t.float().view(-1, 1, 1, 1)) + 0.1 * torch.sin(x.flip(-1))


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_ddim_on_the_integer_grid_is_dits_full_ddim(schedule_name):
    """With N = T steps the continuous sampler is the discrete DDIM over every teacher step."""
    T = 50
    betas = get_beta_schedule(schedule_name, T)
    schedule = ContinuousSchedule(betas)
    diffusion = create_diffusion(T, schedule_name, learn_sigma=False)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    discrete = diffusion.ddim_sample_loop(lambda x, t: _eps_model(x, t), noise)

    def denoise(z, t):
        eps = _eps_model(z, schedule.model_timesteps(t))
        alpha, sigma = schedule.alpha_sigma(t)
        return (z - sigma.float().view(-1, 1, 1, 1) * eps) / alpha.float().view(-1, 1, 1, 1)

    continuous = ddim_sample(denoise, noise, schedule, T)
    assert torch.allclose(continuous, discrete, atol=1e-4, rtol=1e-4)


def test_ddim_step_with_the_true_x_stays_on_the_trajectory():
    """If x_hat is the true x, the deterministic step maps z_t = a_t x + s_t e to a_s x + s_s e."""
    schedule = ContinuousSchedule(get_beta_schedule("linear", 1000))
    x, e = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t, s = torch.tensor([0.8, 0.3], dtype=torch.float64), torch.tensor([0.5, 0.0], dtype=torch.float64)
    (a_t, s_t), (a_s, s_s) = schedule.alpha_sigma(t), schedule.alpha_sigma(s)
    col = lambda v: v.float().view(-1, 1, 1, 1)
    z_t = col(a_t) * x + col(s_t) * e
    assert torch.allclose(ddim_step(z_t, x, a_t, s_t, a_s, s_s), col(a_s) * x + col(s_s) * e, atol=1e-5)


def test_partial_runs_compose():
    schedule = ContinuousSchedule(get_beta_schedule("linear", 1000))
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    denoise = lambda z, t: 0.5 * z
    whole = ddim_sample(denoise, noise, schedule, 8)
    half = ddim_sample(denoise, noise, schedule, 8, start=8, stop=4)
    assert torch.allclose(ddim_sample(denoise, half, schedule, 8, start=4, stop=0), whole)
    with pytest.raises(ValueError):
        ddim_sample(denoise, noise, schedule, 8, start=3, stop=5)

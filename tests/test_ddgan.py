"""Denoising diffusion GAN: the chain against the paper's formula, the posterior against Gaussian
conditioning, R1 against autograd, and the losses moving a generator toward a mixture's modes."""
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from diffusion.ddgan_schedule import DDGANSchedule
from methods.ddgan import DDGANMethod, generation_sampler
from methods.gan_losses import discriminator_loss, generator_loss, r1_penalty


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_chain_is_the_discretised_vp_sde_of_the_paper(steps):
    schedule = DDGANSchedule(steps, 0.1, 20.0)
    t = schedule.eps + (1 - schedule.eps) * torch.arange(steps + 1, dtype=torch.float64) / steps
    torch.testing.assert_close(schedule.times, t)
    # The official construction: var(t) = 1 - exp(2 (-t^2 (b1 - b0) / 4 - t b0 / 2)), alpha_bar = 1 - var,
    # betas = 1 - alpha_bar[k] / alpha_bar[k-1] behind a first beta of 1e-8, x_k = prod sqrt(1 - beta) x_0 + ...
    var = 1 - torch.exp(2 * (-0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1))
    abar = 1 - var
    betas = torch.cat([torch.tensor([1e-8], dtype=torch.float64), 1 - abar[1:] / abar[:-1]])
    torch.testing.assert_close(schedule.alpha_bars, torch.cumprod(1 - betas, 0), atol=2e-8, rtol=0)
    torch.testing.assert_close(schedule.betas, betas[1:])
    assert schedule.alpha_bars[0] == 1 and 0 < schedule.alpha_bars[-1] < 1e-3  # data -> (almost) pure noise
    # every transition is a valid Gaussian step and the chain composes to the marginals
    assert bool(((schedule.betas > 0) & (schedule.betas < 1)).all())
    torch.testing.assert_close(schedule.alpha_bars[1:], torch.cumprod(1 - schedule.betas, 0))


def test_pairs_have_the_forward_marginals():
    schedule = DDGANSchedule(4)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7)
    k = torch.full((x0.shape[0],), 2)
    x_k, x_next = schedule.q_sample_pair(x0, k, torch.randn(x0.shape, generator=gen), torch.randn(x0.shape, generator=gen))
    abar = schedule.alpha_bars.float()
    for x, level in ((x_k, 2), (x_next, 3)):
        se = 5 / math.sqrt(x0.shape[0])
        assert abs(x.mean() - 0.7 * abar[level].sqrt()) < se
        assert abs(x.var() - (1 - abar[level])) < 5 * math.sqrt(2 / x0.shape[0])


def test_posterior_is_the_gaussian_conditional_of_the_pair():
    schedule = DDGANSchedule(4)
    abar, beta = schedule.alpha_bars, schedule.betas
    x0 = torch.tensor([[0.3], [-1.2], [0.9]], dtype=torch.float64)
    x_next = torch.tensor([[0.5], [0.1], [-2.0]], dtype=torch.float64)
    for k in range(4):
        index = torch.full((3,), k)
        mean, variance = schedule.posterior(x0, x_next, index)
        # x_k | x0 ~ N(sqrt(abar_k) x0, 1 - abar_k); x_{k+1} = sqrt(1 - b) x_k + sqrt(b) n
        var_k, b = 1 - abar[k], beta[k]
        cov = (1 - b).sqrt() * var_k
        var_next = (1 - b) * var_k + b
        expected_mean = abar[k].sqrt() * x0 + cov / var_next * (x_next - abar[k + 1].sqrt() * x0)
        torch.testing.assert_close(mean, expected_mean)
        torch.testing.assert_close(variance, (var_k - cov**2 / var_next).expand_as(variance))
    # the last step (k = 0) returns the data: the posterior collapses onto x_0 and no noise is added
    out = schedule.posterior_sample(x0, x_next, torch.zeros(3, dtype=torch.long), torch.randn(3, 1, dtype=torch.float64))
    torch.testing.assert_close(out, x0)


def test_posterior_sample_draws_from_the_posterior():
    schedule = DDGANSchedule(4)
    n = 200_000
    x0, x_next, k = torch.full((n, 1), 0.4), torch.full((n, 1), -0.3), torch.full((n,), 2)
    samples = schedule.posterior_sample(x0, x_next, k, torch.randn(n, 1, generator=torch.Generator().manual_seed(1)))
    mean, variance = schedule.posterior(x0[:1], x_next[:1], k[:1])
    assert abs(samples.mean() - mean.item()) < 5 * math.sqrt(variance.item() / n)
    assert abs(samples.var() / variance.item() - 1) < 5 * math.sqrt(2 / n)


def test_r1_penalty_is_the_squared_input_gradient_and_trains_d():
    a = torch.tensor([0.5, -2.0, 3.0], requires_grad=True)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    logits = (a * x**2).sum(dim=1)  # d logit / dx = 2 a x
    penalty = r1_penalty(logits, x)
    expected = ((2 * a.detach() * x.detach()) ** 2).sum(dim=1).mean()
    torch.testing.assert_close(penalty, expected)
    # the penalty is differentiable in D's parameters: d/da_j mean_b sum_j 4 a_j^2 x_bj^2 = 8 a_j mean_b x_bj^2
    (grad_a,) = torch.autograd.grad(penalty, a)
    torch.testing.assert_close(grad_a, 8 * a.detach() * (x.detach() ** 2).mean(dim=0))


def test_gan_losses_are_the_non_saturating_ones():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sigmoid = torch.sigmoid
    d = -(torch.log(sigmoid(real)).mean() + torch.log(1 - sigmoid(fake)).mean())
    torch.testing.assert_close(discriminator_loss(real, fake), d)
    torch.testing.assert_close(generator_loss(fake), -torch.log(sigmoid(fake)).mean())


class _MLPGenerator(nn.Module):
    """G(x_{k+1}, t, y, z) -> x_0 for 2-D points (the DiT's call signature)."""

    def __init__(self, z_dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 1 + z_dim, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                 nn.Linear(128, 2))

    def forward(self, x, t, y, z):
        return self.net(torch.cat([x, t[:, None] / 1000, z], dim=1))


class _MLPDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128), nn.LeakyReLU(0.2),
                                 nn.Linear(128, 1))

    def forward(self, x_prev, x_t, t, y):
        return self.net(torch.cat([x_prev, x_t, t[:, None] / 1000], dim=1)).squeeze(1)


MODES = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])


def _mixture(n, gen):
    return MODES[torch.randint(len(MODES), (n,), generator=gen)] + 0.1 * torch.randn(n, 2, generator=gen)


def _samples(g, info, n):
    settings = OmegaConf.create({"sampler": "ddgan", "steps": 0, "cfg_scale": 1.0})
    sample = generation_sampler(None, g, {}, {"ddgan": info}, settings)
    generators = [torch.Generator().manual_seed(10_000 + i) for i in range(n)]
    noise = torch.stack([torch.randn(2, generator=gen) for gen in generators])
    with torch.no_grad():
        return sample(noise, torch.zeros(n, dtype=torch.long), generators, False)


def _distance_to_modes(points):
    return torch.cdist(points, MODES).min(dim=1).values.mean().item()


def test_the_losses_move_a_generator_toward_the_modes_of_a_mixture():
    torch.manual_seed(0)
    z_dim = 4
    schedule = DDGANSchedule(2)
    g, d = _MLPGenerator(z_dim), _MLPDiscriminator()
    method = DDGANMethod(g, d, schedule, z_dim, r1_gamma=0.1, lazy_reg=4, d_lr_scale=1.0)
    optimizers = {"discriminator": torch.optim.Adam(d.parameters(), 2e-3, betas=(0.5, 0.9)),
                  "model": torch.optim.Adam(g.parameters(), 2e-3, betas=(0.5, 0.9))}
    info = {"num_steps": 2, "beta_min": 0.1, "beta_max": 20.0, "eps": 1e-3, "z_dim": z_dim}
    before = _distance_to_modes(_samples(g, info, 512))
    data_gen, y = torch.Generator().manual_seed(1), torch.zeros(128, dtype=torch.long)
    for step in range(800):
        method.begin_step(step)
        x = _mixture(128, data_gen)
        for index, objective in enumerate(method.objectives()):  # D, then G, as the training loop
            loss, _ = method.loss(objective.name, {"model": g, "discriminator": d}, x, y,
                                  torch.Generator().manual_seed(2 * step + index))
            optimizers[objective.name].zero_grad(set_to_none=True)
            g.zero_grad(set_to_none=True)
            d.zero_grad(set_to_none=True)
            loss.backward()
            optimizers[objective.name].step()
    samples = _samples(g, info, 512)
    after = _distance_to_modes(samples)
    # the modes are 2 apart from the origin; untrained samples sit ~1.9 away on average
    assert before > 1.0
    assert after < 0.4 * before, (before, after)
    # and every mode is reached (no collapse onto one)
    nearest = torch.cdist(samples, MODES).argmin(dim=1)
    assert all((nearest == m).float().mean() > 0.1 for m in range(len(MODES))), torch.bincount(nearest)

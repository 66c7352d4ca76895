"""KL and discretized Gaussian likelihood against scipy's exact normal distribution."""
import math

import numpy as np
import torch
from scipy.stats import norm

from diffusion.likelihood import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)


def test_normal_kl_closed_form():
    m1, m2 = torch.tensor([0.3, -1.0]), torch.tensor([0.1, 2.0])
    v1, v2 = torch.tensor([0.5, 2.0]), torch.tensor([1.5, 0.25])
    kl = normal_kl(m1, v1.log(), m2, v2.log())
    expected = 0.5 * (torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)
    assert torch.allclose(kl, expected, atol=1e-6)
    assert torch.allclose(normal_kl(m1, v1.log(), m1, v1.log()), torch.zeros(2), atol=1e-7)


def test_approx_cdf_is_close_to_exact():
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    assert np.abs(approx_standard_normal_cdf(x).numpy() - norm.cdf(x.numpy())).max() < 5e-4


def test_discretized_likelihood_matches_bin_probabilities():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    mean, log_scale = torch.full_like(levels, 0.2), torch.full_like(levels, math.log(0.3))
    log_p = discretized_gaussian_log_likelihood(levels, mean, log_scale)
    assert abs(log_p.exp().sum().item() - 1.0) < 1e-3  # the 256 bins cover the real line
    upper = norm.cdf((levels.numpy() + 1 / 255 - 0.2) / 0.3)
    lower = norm.cdf((levels.numpy() - 1 / 255 - 0.2) / 0.3)
    exact = np.where(levels.numpy() < -0.999, upper, np.where(levels.numpy() > 0.999, 1 - lower, upper - lower))
    assert np.allclose(log_p.exp().numpy(), exact, atol=2e-4)


def test_mean_flat_averages_non_batch_dims():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(mean_flat(x), torch.tensor([5.5, 17.5]))

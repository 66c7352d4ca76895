"""Beta schedules against closed-form values computed independently here."""
import math

import numpy as np
import pytest

from diffusion import create_diffusion
from diffusion.schedule import cosine_betas, get_beta_schedule, linear_betas


def test_linear_1000_endpoints_and_alphas_cumprod():
    betas = linear_betas(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1] == pytest.approx(0.02, abs=1e-15)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=0, atol=1e-15)
    # alphas_cumprod[-1] as a plain Python product over the closed-form betas.
    product = math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(1000))
    assert product == pytest.approx(4.0358e-5, rel=1e-4)
    diffusion = create_diffusion()
    assert diffusion.alphas_cumprod[-1] == pytest.approx(product, rel=1e-10)
    assert diffusion.betas.dtype == np.float64 and diffusion.alphas_cumprod.dtype == np.float64


def test_linear_is_scaled_by_1000_over_num_steps():
    betas = linear_betas(100)
    assert betas[0] == pytest.approx(1e-3) and betas[-1] == pytest.approx(0.2)
    # The scaling keeps the final alphas_cumprod small (about the 1000-step value's order).
    assert np.prod(1 - betas) < 1e-4


def test_cosine_telescopes_to_the_continuous_alpha_bar():
    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = cosine_betas(1000)
    abar = np.cumprod(1 - betas)
    for i in (0, 1, 10, 500, 900, 990):
        assert abar[i] == pytest.approx(f((i + 1) / 1000) / f(0), rel=1e-9)
    assert betas[0] == pytest.approx(1 - f(1 / 1000) / f(0), rel=1e-12)
    assert betas[-1] == 0.999  # alpha_bar(1) = 0 would give beta = 1: capped
    assert betas.max() == 0.999 and betas.min() > 0


def test_named_schedules_and_bad_input():
    assert np.array_equal(get_beta_schedule("linear", 1000), linear_betas(1000))
    assert np.array_equal(get_beta_schedule("cosine", 50), cosine_betas(50))
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        get_beta_schedule("quadratic", 1000)
    with pytest.raises(ValueError, match="num_steps"):
        linear_betas(1)
    with pytest.raises(ValueError, match="num_steps"):
        create_diffusion(num_steps=0)

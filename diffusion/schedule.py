"""Beta schedules (pure numpy, float64), spec conventions and IDDPM (Nichol & Dhariwal 2021, Sec. 3.2).

The schedule fixes the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).
Everything downstream (alphas_cumprod, posterior coefficients, respacing) is derived from it in
float64 so that the numbers match the DiT/IDDPM reference to the last digit.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

SCHEDULES = ("linear", "cosine")


def linear_betas(num_steps: int) -> np.ndarray:
    """Ho et al. (2020) linear betas 1e-4..0.02 for 1000 steps, scaled by 1000/num_steps.

    The scale keeps alphas_cumprod at the last step roughly the same for any number of
    steps (IDDPM `get_named_beta_schedule("linear")`).
    """
    _check_num_steps(num_steps)
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(s), s in [0, 1]: beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T).

    Betas are capped at `max_beta` to avoid the singularity where alpha_bar reaches 0 (IDDPM Eq. 17 text).
    """
    _check_num_steps(num_steps)
    betas = []
    for i in range(num_steps):
        s1 = i / num_steps
        s2 = (i + 1) / num_steps
        betas.append(min(1 - alpha_bar(s2) / alpha_bar(s1), max_beta))
    return np.array(betas, dtype=np.float64)


def cosine_alpha_bar(s: float) -> float:
    """IDDPM Eq. 17 with offset 0.008 (the constant f(0) cancels in the beta ratios)."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021) cosine schedule, betas capped at 0.999."""
    return betas_for_alpha_bar(num_steps, cosine_alpha_bar, max_beta)


def get_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """Betas of the named schedule ("linear" or "cosine") for `num_steps` diffusion steps."""
    if name == "linear":
        return linear_betas(num_steps)
    if name == "cosine":
        return cosine_betas(num_steps)
    raise ValueError(f"unknown noise schedule {name!r}; expected one of {', '.join(SCHEDULES)}")


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")

"""SpeeD's threshold tau between the informative steps and the convergence area (spec §1.2)."""
from __future__ import annotations

import math
import numbers

import numpy as np

# SpeeD code: a step is "meaningful" while d/dt sqrt(1 - abar_t) is at least this large.
MEANINGFUL_GRADIENT = 1e-4


def meaningful_steps(alphas_cumprod: np.ndarray) -> int:
    """First index where numpy's gradient of sqrt(1 - abar_t) drops below 1e-4, plus one.

    642 for linear-1000 and 959 for cosine-1000 (spec §1.2). If the gradient never drops
    below the threshold every step counts as meaningful and the result is T.
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    gradient = np.gradient(np.sqrt(1.0 - abar))
    below = np.flatnonzero(gradient < MEANINGFUL_GRADIENT)
    return int(below[0]) + 1 if below.size else int(abar.size)


def resolve_tau(tau, alphas_cumprod: np.ndarray, key: str = "diffusion.timesteps.tau") -> int:
    """The config's tau as an int in (0, T]: "auto" means `meaningful_steps` (spec §1.2).

    tau counts steps of the 1000-step training diffusion, never of a respaced one (spec §1.7.3).
    """
    num_timesteps = len(alphas_cumprod)
    if isinstance(tau, str):
        if tau != "auto":
            raise ValueError(f"{key}={tau!r} must be 'auto' or an integer in (0, {num_timesteps}]")
        return meaningful_steps(alphas_cumprod)
    if (isinstance(tau, bool) or not isinstance(tau, numbers.Real)
            or not math.isfinite(tau) or float(tau) != int(tau)):
        raise ValueError(f"{key}={tau!r} must be 'auto' or an integer in (0, {num_timesteps}]")
    value = int(tau)
    if not 0 < value <= num_timesteps:
        raise ValueError(f"{key}={value} must lie in (0, {num_timesteps}] (steps of the training diffusion)")
    return value

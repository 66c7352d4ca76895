"""Timestep distributions P(t) over the discrete grid t = 0..T-1, as float64 numpy tables.

Pure functions: each returns a probability vector that sums to one. Drawing from the table and
SpeeD's dual sampling live in `strategy.py` and `dual.py`.
"""
from __future__ import annotations

import numpy as np
import torch

from .snr import log_snr


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF (handles +-inf)."""
    return torch.special.ndtr(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def _normal_interval(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """P(lower < Z <= upper) for Z ~ N(0, 1), using the upper tail where that avoids cancellation."""
    upper_tail = lower > 0
    return np.where(
        upper_tail,
        _normal_cdf(-lower) - _normal_cdf(-upper),
        _normal_cdf(upper) - _normal_cdf(lower),
    )


def uniform_probabilities(num_timesteps: int) -> np.ndarray:
    """P(t) = 1/T: the DiT / IDDPM default."""
    return np.full(num_timesteps, 1.0 / num_timesteps)


def speed_probabilities(num_timesteps: int, tau: int, k: float) -> np.ndarray:
    """SpeeD asymmetric sampling (spec §1.3, `Speed_IDDPM`).

    P(t) = k / (T + tau (k - 1)) for t < tau and 1 / (T + tau (k - 1)) for t >= tau:
    steps before tau are k times as likely as steps in the convergence area.
    """
    if k <= 0:
        raise ValueError(f"SpeeD suppression intensity k={k} must be positive")
    if not 0 < tau <= num_timesteps:
        raise ValueError(f"SpeeD tau={tau} must lie in (0, {num_timesteps}]")
    t = np.arange(num_timesteps)
    return np.where(t < tau, float(k), 1.0) / (num_timesteps + tau * (k - 1.0))


def speed_legacy_probabilities(alphas_cumprod: np.ndarray) -> np.ndarray:
    """The older public SpeeD code's sampler (spec §1.3, `1zeryu/SpeeD` 439c555).

    p_t proportional to tanh(1e6 (g_t - 1e-4)) + 1.5 with g the numpy gradient of sqrt(1 - abar):
    in effect a step 2.5 vs 0.5 (k = 5) at the implied tau = meaningful_steps (642 for linear-1000),
    with a soft edge over t = 639..643. P(t < 642) = 0.90 for linear-1000.
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    gradient = np.gradient(np.sqrt(1.0 - abar))
    unnormalised = np.tanh(1e6 * (gradient - 1e-4)) + 1.5
    return unnormalised / unnormalised.sum()


def log_snr_gaussian_probabilities(alphas_cumprod: np.ndarray, loc: float, scale: float) -> np.ndarray:
    """P(t) for log SNR ~ N(loc, scale^2), mapped onto the grid's log SNR_t (spec §2).

    Bin t covers log SNR between the midpoints to its neighbours; the outer bins reach to +-inf,
    so the tails are folded into t = 0 and t = T - 1 and the table sums to one exactly.
    """
    if not scale > 0:
        raise ValueError(f"log-SNR Gaussian scale={scale} must be positive")
    grid = log_snr(alphas_cumprod)  # decreasing in t
    midpoints = 0.5 * (grid[:-1] + grid[1:])
    upper = np.concatenate([[np.inf], midpoints])
    lower = np.concatenate([midpoints, [-np.inf]])
    return _normal_interval((lower - loc) / scale, (upper - loc) / scale)


def lognormal_probabilities(alphas_cumprod: np.ndarray, mean: float, std: float) -> np.ndarray:
    """EDM training distribution ln sigma ~ N(mean, std^2) on the DDPM grid (spec §2).

    sigma = 1/sqrt(SNR), so log SNR = -2 ln sigma ~ N(-2 mean, (2 std)^2). EDM's own values are
    mean = -1.2, std = 1.2 (mode t = 16, mean t = 133 on linear-1000).
    """
    return log_snr_gaussian_probabilities(alphas_cumprod, -2.0 * mean, 2.0 * std)


def logitnormal_probabilities(alphas_cumprod: np.ndarray, mean: float, std: float) -> np.ndarray:
    """SD3 / LightningDiT logit-normal s = sigmoid(u), u ~ N(mean, std^2), on the DDPM grid (spec §2).

    The rectified-flow SNR is ((1 - s)/s)^2 = exp(-2u), so log SNR ~ N(-2 mean, (2 std)^2).
    Note ln sigma = u: this is the same family as `lognormal`, only the customary defaults
    differ (SD3: mean = 0, std = 1, giving mode t = 142 and mean t = 279 on linear-1000).
    """
    return log_snr_gaussian_probabilities(alphas_cumprod, -2.0 * mean, 2.0 * std)


def logitnormal_index_probabilities(num_timesteps: int, mean: float, std: float) -> np.ndarray:
    """The naive mapping t = floor(T sigmoid(u)), u ~ N(mean, std^2) (spec §2).

    A different distribution from `logitnormal`: it ignores the schedule, so for (0, 1) it peaks
    in the middle of the index range (t = 499/500, an exact tie by symmetry).
    """
    if not std > 0:
        raise ValueError(f"logit-normal std={std} must be positive")
    s = np.arange(num_timesteps + 1) / num_timesteps  # bin t is [t/T, (t+1)/T)
    with np.errstate(divide="ignore"):
        edges = np.log(s) - np.log1p(-s)  # logit, -inf at 0 and +inf at 1
    z = (edges - mean) / std
    return _normal_interval(z[:-1], z[1:])

"""Loss weightings w_t that multiply the per-sample eps-MSE, as float64 numpy tables [T].

Pure functions of the training schedule (spec §1.5 and §2); `normalize_weights` rescales a
table to mean one under a sampling distribution (spec §1.7.1).
"""
from __future__ import annotations

import numpy as np

from .snr import snr


def no_weighting(num_timesteps: int) -> np.ndarray:
    """w_t = 1: the plain IDDPM / DiT objective."""
    return np.ones(num_timesteps)


def speed_weights(alphas_cumprod: np.ndarray, tau: int, lam: float) -> np.ndarray:
    """SpeeD change-aware weighting, paper version (spec §1.5, `weighting: ours`).

    g = numpy gradient of 1 - abar, min-max normalised over all T steps to g_hat in [0, 1];
    w_t = (1 - lam) + (2 lam - 1) g_hat_t for t < tau and w_t = 1 for t >= tau. With lam = 0.6
    the weights below tau lie in [0.4, 0.6], peaking at the acceleration maximum (t = 219 linear).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"SpeeD lam={lam} must lie in [0, 1]; outside it some weights are negative")
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    gradient = np.gradient(1.0 - abar)
    g_hat = (gradient - gradient.min()) / (gradient.max() - gradient.min())
    below_tau = np.arange(abar.size) < tau
    return np.where(below_tau, (1.0 - lam) + (2.0 * lam - 1.0) * g_hat, 1.0)


def p2_weights(alphas_cumprod: np.ndarray, k: float, gamma: float) -> np.ndarray:
    """P2 weighting (Choi+ 2022): w_t = 1 / (k + SNR_t)^gamma (spec §2).

    k = 1, gamma = 1 gives 1 - abar_t, the older SpeeD code's weighting (spec §1.5).
    """
    if k < 0 or gamma < 0:
        raise ValueError(f"P2 needs k >= 0 and gamma >= 0, got k={k}, gamma={gamma}")
    return 1.0 / (k + snr(alphas_cumprod)) ** gamma


def min_snr_weights(alphas_cumprod: np.ndarray, gamma: float) -> np.ndarray:
    """Min-SNR-gamma (Hang+ 2023) for an eps-prediction model: w_t = min(SNR_t, gamma) / SNR_t.

    Full weight 1 wherever SNR_t <= gamma (t >= 130 on linear-1000 for gamma = 5), less at the
    low-noise end. (The x0 form would be min(SNR, gamma); the v form divides by SNR + 1.)
    """
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma={gamma} must be positive")
    ratio = snr(alphas_cumprod)
    return np.minimum(ratio, gamma) / ratio


def edm_weights(alphas_cumprod: np.ndarray, sigma_data: float = 0.5) -> np.ndarray:
    """EDM's lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 moved to eps-space (spec §2).

    The x0 error is sigma times the eps error, so w_t = lambda sigma^2 = 1 + 1 / (sigma_d^2 SNR_t).
    """
    return 1.0 + 1.0 / (sigma_data**2 * snr(alphas_cumprod))


def normalize_weights(weights: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """w / E_{t~P}[w_t], so the weighted objective keeps the scale of the unweighted one (spec §1.7.1)."""
    expectation = float(np.dot(probabilities, weights))
    if not expectation > 0:
        raise ValueError(f"cannot normalise weights whose expectation under P is {expectation}")
    return weights / expectation

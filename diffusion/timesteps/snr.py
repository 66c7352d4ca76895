"""Signal-to-noise ratio of a discrete schedule: SNR_t = abar_t / (1 - abar_t) (spec conventions)."""
from __future__ import annotations

import numpy as np


def _checked(alphas_cumprod: np.ndarray) -> np.ndarray:
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    if abar.ndim != 1 or abar.size == 0:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D array, got shape {abar.shape}")
    if not np.all((abar > 0) & (abar < 1)):
        raise ValueError("alphas_cumprod must lie strictly inside (0, 1) for the SNR to be finite and positive")
    return abar


def snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """SNR_t = abar_t / (1 - abar_t), float64."""
    abar = _checked(alphas_cumprod)
    return abar / (1.0 - abar)


def log_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """log SNR_t, computed as log(abar) - log1p(-abar) so that it stays accurate near abar = 1."""
    abar = _checked(alphas_cumprod)
    return np.log(abar) - np.log1p(-abar)

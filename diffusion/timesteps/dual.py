"""SpeeD's dual ("symmetric") sampling, found in both public code versions (spec §1.4).

A batch of n holds m = floor(n/2) + 1 primaries drawn from P, followed by the duals of the
first n - m primaries, reflected around the pivot tau_d = meaningful_steps (not the config tau):
dual(t) = tau_d - t for t < tau_d, t - tau_d otherwise. Every dual lands in [0, tau_d].
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def num_primaries(batch_size: int) -> int:
    """m = floor(n/2) + 1 primaries (so an even batch has n/2 + 1 primaries and n/2 - 1 duals)."""
    return batch_size // 2 + 1


def dual_timesteps(t: torch.Tensor, pivot: int) -> torch.Tensor:
    """dual(t) = pivot - t below the pivot, t - pivot from the pivot on."""
    return torch.where(t < pivot, pivot - t, t - pivot)


def dual_batch(primaries: torch.Tensor, pivot: int, batch_size: int) -> torch.Tensor:
    """Primaries followed by their duals, truncated to `batch_size` (the code's concat + slice)."""
    return torch.cat([primaries, dual_timesteps(primaries, pivot)])[:batch_size]


def dual_probabilities(p: np.ndarray, pivot: int) -> np.ndarray:
    """Distribution of dual(t) for t ~ p."""
    num_timesteps = len(p)
    if not 0 <= pivot < num_timesteps:
        raise ValueError(f"dual pivot {pivot} must lie in [0, {num_timesteps})")
    t = np.arange(num_timesteps)
    duals = np.where(t < pivot, pivot - t, t - pivot)
    return np.bincount(duals, weights=p, minlength=num_timesteps)


def dual_marginal(p: np.ndarray, pivot: int, batch_size: Optional[int] = None) -> np.ndarray:
    """Marginal P(t) of one element of a dual-sampled batch.

    With `batch_size` n: (m p + (n - m) D) / n, D the dual distribution, m = num_primaries(n),
    which is exact for that n. Without it: the large-n limit (p + D) / 2, the 50/50 mixture of
    spec §1.4.
    """
    duals = dual_probabilities(p, pivot)
    if batch_size is None:
        return 0.5 * (p + duals)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    m = num_primaries(batch_size)
    n_duals = batch_size - min(m, batch_size)
    return ((batch_size - n_duals) * p + n_duals * duals) / batch_size

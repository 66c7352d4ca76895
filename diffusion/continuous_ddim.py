"""Deterministic DDIM in continuous time: the sampler of distilled students and of their teachers.

One step from time t to s < t, given the denoised prediction x_hat at t (Song et al. 2021, Eq. 12
with eta = 0; Salimans & Ho 2022, Eq. 3):

    z_s = alpha_s x_hat + (sigma_s / sigma_t) (z_t - alpha_t x_hat)

N steps run on the grid t_i = i/N from t = 1 (z_1 = the initial noise) down to t = 0, where
sigma = 0 and the last step returns x_hat. Nothing is random after the initial noise, so image i
depends only on its own noise.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from diffusion.continuous_schedule import ContinuousSchedule

# denoise(z_t [B, C, H, W], t [B] float64) -> x_hat [B, C, H, W]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_step(
    z_t: torch.Tensor, x_hat: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor, alpha_s: torch.Tensor, sigma_s: torch.Tensor
) -> torch.Tensor:
    """z_s = alpha_s x_hat + (sigma_s / sigma_t)(z_t - alpha_t x_hat); coefficients are [B] tensors (any float dtype)."""
    shape = (-1,) + (1,) * (z_t.ndim - 1)
    ratio = (sigma_s / sigma_t).to(torch.float32).view(shape)
    a_t, a_s = alpha_t.to(torch.float32).view(shape), alpha_s.to(torch.float32).view(shape)
    return a_s * x_hat + ratio * (z_t - a_t * x_hat)


def time_grid(steps: int) -> torch.Tensor:
    """t_i = i / steps for i = steps..0 (float64, descending)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the DDIM step count must be a positive integer, got {steps!r}")
    return torch.arange(steps, -1, -1, dtype=torch.float64) / steps


def ddim_sample(
    denoise: Denoiser,
    noise: torch.Tensor,
    schedule: ContinuousSchedule,
    steps: int,
    progress: bool = False,
    start: int | None = None,
    stop: int = 0,
) -> torch.Tensor:
    """Run DDIM on the grid i/steps from i = start (default steps: t = 1, z = noise) down to i = stop.

    Returns float32 z at t = stop/steps (x_hat itself when stop = 0).
    """
    grid = time_grid(steps)
    start = steps if start is None else start
    if not 0 <= stop < start <= steps:
        raise ValueError(f"need 0 <= stop < start <= steps, got start={start} stop={stop} steps={steps}")
    z = noise.float()
    batch = z.shape[0]
    with torch.no_grad():
        for i in tqdm(range(start, stop, -1), desc=f"ddim{steps}", disable=not progress):
            t = grid[steps - i].expand(batch).to(z.device)
            s = grid[steps - i + 1].expand(batch).to(z.device)
            alpha_t, sigma_t = schedule.alpha_sigma(t)
            alpha_s, sigma_s = schedule.alpha_sigma(s)
            x_hat = denoise(z, t).float()
            z = ddim_step(z, x_hat, alpha_t, sigma_t, alpha_s, sigma_s)
    return z

"""Continuous time for a discrete-time DiT teacher (progressive distillation, Salimans & Ho 2022).

Progressive distillation works in continuous time: z_t = alpha_t x + sigma_t eps with
alpha_t^2 + sigma_t^2 = 1, t in [0, 1], and sampler grids t = i/N for any N. DiT was trained on
T discrete steps k = 0..T-1 (alpha_bar_k = prod_{j<=k} (1 - beta_j)), so we define:

- time t <-> step position k(t) = T t - 1, so t = 0 is clean data (k = -1, alpha_bar = 1) and
  t = 1 is the teacher's last step T - 1, where DiT's samplers start from pure noise;
- log alpha_bar interpolated linearly in k between integer steps (the process whose beta is
  constant within each step), so alpha_bar(t) is exactly the teacher's at every t = (k + 1)/T,
  strictly decreasing in between, and alpha^2 + sigma^2 = 1 holds by construction;
- the network sees the float timestep clamp(T t - 1, 0, T - 1) (DiT's sinusoidal embedding takes
  floats). Only t < 1/T, where sigma < sqrt(beta_0) = 0.01 and the input barely matters,
  is clamped.

On the grid t_i = i/T this process and DDIM on it are DiT's own 1000-step process and DDIM.
"""
from __future__ import annotations

import numpy as np
import torch


class ContinuousSchedule:
    """alpha(t), sigma(t), log-SNR(t) and the teacher's timestep for t in [0, 1] (float64 math)."""

    def __init__(self, betas: np.ndarray):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D array of at least 2 values in (0, 1)")
        self.num_steps = len(betas)
        # entry j is log alpha_bar at step position k = j - 1 (entry 0: clean data)
        self._log_alpha_bar = torch.from_numpy(np.concatenate([[0.0], np.cumsum(np.log1p(-betas))]))

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_bar at times t (float64, on t's device), linear between integer steps."""
        table = self._log_alpha_bar.to(t.device)
        position = (torch.as_tensor(t, dtype=torch.float64, device=t.device) * self.num_steps).clamp(0, self.num_steps)
        low = position.floor().clamp(max=self.num_steps - 1).long()
        frac = position - low
        return table[low] + frac * (table[low + 1] - table[low])

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) in float64: sqrt(alpha_bar) and sqrt(1 - alpha_bar)."""
        log_abar = self.log_alpha_bar(t)
        return torch.exp(0.5 * log_abar), torch.sqrt(-torch.expm1(log_abar))

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t = log(alpha_t^2 / sigma_t^2), strictly decreasing in t (+inf at t = 0)."""
        log_abar = self.log_alpha_bar(t)
        return log_abar - torch.log(-torch.expm1(log_abar))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The float timestep the DiT network is given for time t: clamp(T t - 1, 0, T - 1)."""
        k = (torch.as_tensor(t, dtype=torch.float64) * self.num_steps - 1).clamp(0, self.num_steps - 1)
        k = torch.where((k - k.round()).abs() < 1e-6, k.round(), k)  # i/N * T in float64 can miss an integer by 1 ulp
        return k.float()

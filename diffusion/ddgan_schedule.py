"""The few-step diffusion of a denoising diffusion GAN (Xiao, Kreis & Vahdat, ICLR 2022).

DDGAN discretises the VP SDE (beta_min 0.1, beta_max 20) at T + 1 times
    t_k = eps + (1 - eps) k / T,  k = 0..T,  eps = 1e-3 (the small-t offset),
with the VP marginal variance var(t) = 1 - abar(t), abar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2). The chain starts at the data:
abar_k = abar(t_k) / abar(t_0) (the official code's first beta is 1e-8, so x_0 is the data up to
1e-8), and beta_k = 1 - abar_k / abar_{k-1} for k = 1..T.

Training pairs (x_k, x_{k+1}) come from the forward process; sampling starts at x_T ~ N(0, I)
and at each k = T-1..0 draws x_k from the Gaussian posterior q(x_k | x_{k+1}, x_0 = G(x_{k+1}, z, k)),
without noise at k = 0. All formulas in float64, tensors returned in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EPS_SMALL = 1e-3


def vp_alpha_bar(t: torch.Tensor, beta_min: float, beta_max: float) -> torch.Tensor:
    """abar(t) = exp(-int_0^t beta(s) ds) of the VP SDE with beta(s) = beta_min + s (beta_max - beta_min)."""
    return torch.exp(-beta_min * t - 0.5 * (beta_max - beta_min) * t**2)


def _view(values: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[index] shaped [B, 1, ...] to broadcast against `like`, on its device and dtype."""
    out = values.to(like.device)[index.to(like.device)]
    return out.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class DDGANSchedule:
    """The T-step chain, its pair sampler and its posterior; step index k in 0..T (0 = data)."""

    num_steps: int = 4
    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = EPS_SMALL

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"the DDGAN chain needs at least one step, got num_steps={self.num_steps}")
        if not 0 < self.beta_min < self.beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {self.beta_min}, {self.beta_max}")

    @property
    def times(self) -> torch.Tensor:
        """t_k, k = 0..T (float64)."""
        k = torch.arange(self.num_steps + 1, dtype=torch.float64)
        return self.eps + (1.0 - self.eps) * k / self.num_steps

    @property
    def alpha_bars(self) -> torch.Tensor:
        """abar_k relative to the data at k = 0 (abar_0 = 1), k = 0..T."""
        abar = vp_alpha_bar(self.times, self.beta_min, self.beta_max)
        return abar / abar[0]

    @property
    def betas(self) -> torch.Tensor:
        """beta_k = 1 - abar_k / abar_{k-1} for the transitions k = 1..T (index 0 is transition 1)."""
        abar = self.alpha_bars
        return 1.0 - abar[1:] / abar[:-1]

    def network_time(self, k: torch.Tensor) -> torch.Tensor:
        """What the networks see for the pair (x_k, x_{k+1}): 1000 t_{k+1}, DiT's timestep scale."""
        return (1000.0 * self.times[1:]).float().to(k.device)[k.long()]  # indexed on k's device: no host sync

    def q_sample(self, x0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_k = sqrt(abar_k) x_0 + sqrt(1 - abar_k) noise."""
        abar = self.alpha_bars
        return _view(abar.sqrt(), k, x0) * x0 + _view((1.0 - abar).sqrt(), k, x0) * noise

    def q_sample_pair(self, x0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor, noise_next: torch.Tensor):
        """(x_k, x_{k+1}): x_k from the marginal, then one forward step x_{k+1} = sqrt(1-b) x_k + sqrt(b) n."""
        x_k = self.q_sample(x0, k, noise)
        beta = self.betas
        x_next = _view((1.0 - beta).sqrt(), k, x0) * x_k + _view(beta.sqrt(), k, x0) * noise_next
        return x_k, x_next

    def posterior(self, x0: torch.Tensor, x_next: torch.Tensor, k: torch.Tensor):
        """Mean and variance of q(x_k | x_{k+1}, x_0) (DDPM eq. 6-7 with this chain's betas)."""
        abar, beta = self.alpha_bars, self.betas
        abar_prev, abar_next = abar[:-1], abar[1:]  # at k and k + 1
        coef_x0 = beta * abar_prev.sqrt() / (1.0 - abar_next)
        coef_xt = (1.0 - abar_prev) * (1.0 - beta).sqrt() / (1.0 - abar_next)
        variance = beta * (1.0 - abar_prev) / (1.0 - abar_next)
        mean = _view(coef_x0, k, x0) * x0 + _view(coef_xt, k, x0) * x_next
        return mean, _view(variance, k, x0)

    def posterior_sample(self, x0: torch.Tensor, x_next: torch.Tensor, k: torch.Tensor, noise: torch.Tensor):
        """x_k ~ q(x_k | x_{k+1}, x_0); the mean alone at k = 0 (the last step returns the data)."""
        mean, variance = self.posterior(x0, x_next, k)
        nonzero = (k != 0).to(x0.dtype).view(-1, *([1] * (x0.ndim - 1))).to(x0.device)
        return mean + nonzero * variance.clamp_min(1e-20).sqrt() * noise

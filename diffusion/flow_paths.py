"""Interpolant paths of flow matching (SiT: Ma et al. 2024, arXiv 2401.08740), as pure functions.

This tool has ONE time inside: x_t = alpha_t x + sigma_t eps with t = 0 the data and t = 1 the noise
(REPA's, MeanFlow's and SD3's time). SiT's code runs the other way (its tau = 1 - t is 1 at the data);
the network of a checkpoint is told its own time by methods/flow.py. Everything here is in our time;
derivatives are d/dt. Paths (docs/METHODS.md):

  linear  alpha = 1 - t, sigma = t                                   (rectified flow; SiT's "Linear")
  gvp     alpha = cos(pi t / 2), sigma = sin(pi t / 2)               (SiT's "GVP", REPA's "cosine")
  vp      alpha = exp(m(t)), sigma = sqrt(1 - alpha^2),              (SiT's "VP": the VP SDE of Song et
          m(t) = -t^2 (b_max - b_min) / 4 - t b_min / 2               al. with b 0.1..20, re-timed)

The velocity u_t = dx_t/dt = alpha' x + sigma' eps points from the data to the noise; SiT's velocity is
its negative. drift_var = sigma sigma' - (alpha'/alpha) sigma^2 (SiT's name; it is invariant under
t -> 1 - t) links velocity, noise and score: score = -eps / sigma and
  v = (alpha'/alpha) x + (drift_var / sigma) eps = (alpha'/alpha) x - drift_var score.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PATHS = ("linear", "gvp", "vp")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = ("none", "velocity", "likelihood")
DIFFUSION_FORMS = ("constant", "sbdm", "sigma", "linear", "decreasing", "increasing-decreasing")
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0


@dataclass(frozen=True)
class Interpolant:
    """One path; every method takes t as a float64 tensor (any shape) and returns tensors of its shape."""

    path: str = "linear"

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"unknown flow path {self.path!r}; expected one of {', '.join(PATHS)}")

    def _vp_log_alpha(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """m(t) and m'(t) of the VP path."""
        m = -0.25 * t**2 * (VP_BETA_MAX - VP_BETA_MIN) - 0.5 * t * VP_BETA_MIN
        dm = -0.5 * t * (VP_BETA_MAX - VP_BETA_MIN) - 0.5 * VP_BETA_MIN
        return m, dm

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.path == "linear":
            return 1.0 - t, t
        if self.path == "gvp":
            return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)
        alpha = torch.exp(self._vp_log_alpha(t)[0])
        return alpha, torch.sqrt(1.0 - alpha**2)

    def derivatives(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha', sigma') = d/dt."""
        if self.path == "linear":
            return -torch.ones_like(t), torch.ones_like(t)
        if self.path == "gvp":
            half_pi = 0.5 * math.pi
            return -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t)
        m, dm = self._vp_log_alpha(t)
        alpha = torch.exp(m)
        sigma = torch.sqrt(1.0 - alpha**2)
        return dm * alpha, -dm * alpha**2 / sigma

    def alpha_over_d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha / alpha', written so that it is finite at t = 1 (where alpha = 0 for linear and gvp)."""
        if self.path == "linear":
            return t - 1.0
        if self.path == "gvp":
            angle = 0.5 * math.pi * t
            return -(2.0 / math.pi) * torch.cos(angle) / torch.sin(angle)
        return 1.0 / self._vp_log_alpha(t)[1]

    def drift_var(self, t: torch.Tensor) -> torch.Tensor:
        """sigma sigma' - (alpha'/alpha) sigma^2, in closed form per path (> 0 on (0, 1))."""
        if self.path == "linear":
            return t / (1.0 - t)
        if self.path == "gvp":
            return 0.5 * math.pi * torch.tan(0.5 * math.pi * t)
        return -self._vp_log_alpha(t)[1]

    def interpolate(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, u_t) for data x, noise eps and times t [B]: the network input and the velocity target."""
        alpha, sigma = (_rows(c, x) for c in self.alpha_sigma(t))
        d_alpha, d_sigma = (_rows(c, x) for c in self.derivatives(t))
        return alpha * x + sigma * noise, d_alpha * x + d_sigma * noise

    def score_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x) from the velocity: ((alpha/alpha') v - x) / (sigma^2 - (alpha/alpha') sigma sigma')."""
        ratio = _rows(self.alpha_over_d_alpha(t), x)
        sigma = self.alpha_sigma(t)[1]
        d_sigma = self.derivatives(t)[1]
        var = _rows(sigma**2, x) - ratio * _rows(sigma * d_sigma, x)
        return (ratio * v - x) / var

    def velocity_from_score(self, score: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha_sigma(t)[0]
        d_alpha = self.derivatives(t)[0]
        return _rows(d_alpha / alpha, x) * x - _rows(self.drift_var(t), x) * score

    def velocity_from_noise(self, noise: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        d_alpha = self.derivatives(t)[0]
        return _rows(d_alpha / alpha, x) * x + _rows(self.drift_var(t) / sigma, x) * noise

    def velocity(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
        """The velocity field from a network output that predicts `prediction` (velocity, noise or score)."""
        if prediction == "velocity":
            return output
        if prediction == "noise":
            return self.velocity_from_noise(output, x, t)
        if prediction == "score":
            return self.velocity_from_score(output, x, t)
        raise ValueError(f"unknown flow prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}")

    def loss_weight(self, t: torch.Tensor, weighting: str) -> torch.Tensor:
        """SiT's weights of the noise / score losses: none 1, velocity (drift_var / sigma)^2, likelihood
        drift_var / sigma^2."""
        if weighting == "none":
            return torch.ones_like(t)
        sigma = self.alpha_sigma(t)[1]
        if weighting == "velocity":
            return (self.drift_var(t) / sigma) ** 2
        if weighting == "likelihood":
            return self.drift_var(t) / sigma**2
        raise ValueError(f"unknown flow loss weight {weighting!r}; expected one of {', '.join(LOSS_WEIGHTS)}")

    def diffusion(self, t: torch.Tensor, form: str, norm: float = 1.0) -> torch.Tensor:
        """D(t) of the SDE that shares the ODE's marginals (diffusion sqrt(2 D)); SiT's forms in our time."""
        if form == "constant":
            return torch.full_like(t, float(norm))
        if form == "sbdm":
            return norm * self.drift_var(t)
        if form == "sigma":
            return norm * self.alpha_sigma(t)[1]
        if form == "linear":
            return norm * t
        if form == "decreasing":
            return 0.25 * (1.0 - norm * torch.cos(math.pi * t)) ** 2
        if form == "increasing-decreasing":
            return norm * torch.sin(math.pi * t) ** 2
        raise ValueError(f"unknown diffusion form {form!r}; expected one of {', '.join(DIFFUSION_FORMS)}")


def training_interval(path: str, prediction: str, eps: float) -> tuple[float, float]:
    """[t_lo, t_hi] of training times, as SiT's `check_interval`: the whole [0, 1] for velocity on linear/gvp,
    away from the data and the noise for noise/score there, away from the data for vp (singular at t = 0)."""
    if path == "vp":
        return eps, 1.0
    if prediction != "velocity":
        return eps, 1.0 - eps
    return 0.0, 1.0


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t) (SD3's shift in our time, t = 1 noise): s > 1 moves times toward the noise."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_training_times(batch: int, generator: torch.Generator, interval: tuple[float, float], sampling: str,
                          mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """Training times [B] (float64, CPU): uniform or logit-normal (t = sigmoid(N(mean, std)), SD3), then shifted,
    mapped linearly into the path's interval."""
    if sampling == "uniform":
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
    elif sampling == "logit_normal":
        u = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, dtype=torch.float64))
    else:
        raise ValueError(f"unknown flow.time_sampling {sampling!r}; expected uniform or logit_normal")
    lo, hi = interval
    return lo + (hi - lo) * shift_time(u, shift)


def _rows(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient [B] as [B, 1, ...] in `like`'s dtype and device."""
    return c.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))

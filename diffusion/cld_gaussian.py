"""CLD on Gaussian data: the exact score, and a sampler's exact output moments -- the yardstick for the samplers.

When the data are Gaussian, x_0 ~ N(m, s^2) per dimension, every marginal p_t(u) of CLD is Gaussian and its
velocity score is known in closed form and affine in (x, v). SSCS, Euler-Maruyama and the fixed-step ODE
solvers are then affine maps of the prior draw and of each noise draw, so the mean and variance of what they
produce can be computed exactly, without sampling: the errors they show are the discretisation's alone (no
network, no Monte Carlo noise). tests/test_cld_math.py and scripts/cld_sampler_study.py measure with this.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from diffusion.cld import CLD

F64 = torch.float64


@dataclass(frozen=True)
class GaussianData:
    """Independent dimensions x_0,d ~ N(mean_d, std_d^2) (float64 [D] tensors)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, mean, std) -> "GaussianData":
        return cls(torch.as_tensor(mean, dtype=F64), torch.as_tensor(std, dtype=F64))


def exact_score(cld: CLD, data: GaussianData, means: Optional[torch.Tensor] = None):
    """score(x, v, t, rows=None): the exact velocity score of p_t(u) (any per-row t); with `means` [B], row i's
    data has mean means[i] (a class-conditional score: it needs to know which rows it sees).

    p_t(u) = N(a m, Sigma_t + a a^T s^2) per dimension with a = (a_x, a_v) the mean coefficients,
    so grad_v log p_t = -(C^-1 (u - a m))_v = -(Cxx (v - a_v m) - Cxv (x - a_x m)) / det C.
    """

    def score(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, rows=None) -> torch.Tensor:
        mean = data.mean
        if means is not None:
            mean = (means if rows is None else means[rows]).view(-1, *([1] * (x.dim() - 1)))
        a_x, a_v = (c.view(-1, 1) for c in cld.mean_coefficients(t))
        s_xx, s_xv, s_vv = (c.view(-1, 1) for c in cld.covariance(t))
        var = data.std**2
        c_xx, c_xv, c_vv = s_xx + a_x * a_x * var, s_xv + a_x * a_v * var, s_vv + a_v * a_v * var
        det = c_xx * c_vv - c_xv * c_xv
        return -(c_xx * (v - a_v * mean) - c_xv * (x - a_x * mean)) / det

    return score


def output_moments(cld: CLD, data: GaussianData, sampler, steps: int,
                   draws_per_step: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and variance [D] of `sampler`'s x output under the exact score.

    sampler(cld, score, x, v, steps, noise) as in diffusion/cld_samplers.py. Row 0 gets all zeros (its output
    is the mean), row 1 a unit prior x, row 2 a one-std prior v, and row 3 + j a unit value in the j-th noise
    draw only: the variance is the sum of the squared deviations of rows 1.. from row 0. `draws_per_step`
    bounds the noise draws (SSCS draws 4 per interval, Euler-Maruyama 1, the ODEs none).
    """
    draws = []
    rows = 3 + draws_per_step * steps
    x = torch.zeros(rows, len(data.mean), dtype=F64)
    v = torch.zeros_like(x)
    x[1], v[2] = 1.0, math.sqrt(cld.mass)

    def impulse(shape):
        j = 3 + len(draws)
        if j >= rows or tuple(shape) != tuple(x.shape):
            raise ValueError(f"the sampler drew more than {draws_per_step} noise tensors per step")
        z = torch.zeros(shape, dtype=F64)
        z[j] = 1.0
        draws.append(j)
        return z

    out, _ = sampler(cld, exact_score(cld, data), x, v, steps, impulse)
    out = out.to(F64)  # float32 outputs: 1e-7 relative, far below the errors measured with this
    deviations = out[1 : 3 + len(draws)] - out[0]
    return out[0], deviations.pow(2).sum(0)


def moment_error(data: GaussianData, mean: torch.Tensor, var: torch.Tensor, target: tuple | None = None) -> float:
    """Largest of |mean - m| / s and |var - s^2| / s^2 over the dimensions: 0.1 means moments 10% of the data's
    spread off. (m, s^2) are the data's moments unless `target` gives other (mean, variance)."""
    ref_mean, ref_var = target if target is not None else (data.mean, data.std**2)
    return max(((mean - ref_mean) / data.std).abs().max().item(),
               ((var - ref_var) / data.std**2).abs().max().item())

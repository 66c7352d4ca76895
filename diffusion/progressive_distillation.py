"""Progressive distillation math (Salimans & Ho, ICLR 2022, arXiv 2202.00512), as pure functions.

A student with N sampling steps is trained so that ONE of its DDIM steps from t to t - 1/N lands
where TWO of its teacher's DDIM steps (t -> t - 0.5/N -> t - 1/N) land (paper Algorithm 2):

    x_tilde = (z_{t''} - (sigma_{t''} / sigma_t) z_t) / (alpha_{t''} - (sigma_{t''} / sigma_t) alpha_t)

is the x-prediction that makes the student's single DDIM step reproduce z_{t''} exactly. At
t'' = 0 (sigma = 0, alpha = 1) it is the teacher's second x_hat, the released code's i = 0 case.

Parameterisations of the network output (paper Sec. 4), with z_t = alpha_t x + sigma_t eps:
  v:   v = alpha_t eps - sigma_t x,  x_hat = alpha_t z_t - sigma_t v_hat
  x:   the output is x_hat
  eps: x_hat = (z_t - sigma_t eps_hat) / alpha_t  (ill-posed as alpha_t -> 0, i.e. few steps)

Loss weights on ||x_tilde - x_hat||^2 (paper Sec. 4):
  snr_trunc     max(SNR, 1): the larger of the x-MSE and the eps-MSE (the released configs)
  snr_plus_one  SNR + 1 = 1/sigma^2: exactly the v-MSE
"""
from __future__ import annotations

import torch

PARAMETERIZATIONS = ("v", "x", "eps")
LOSS_WEIGHTS = ("snr_trunc", "snr_plus_one")


def _column(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] coefficient as float32 [B, 1, ..., 1] to broadcast over `like`."""
    return coef.to(torch.float32).view((-1,) + (1,) * (like.ndim - 1))


def x_from_output(output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, parameterization: str) -> torch.Tensor:
    """The denoised x_hat from the network's output read as v, x or eps."""
    a, s = _column(alpha, z), _column(sigma, z)
    if parameterization == "v":
        return a * z - s * output
    if parameterization == "x":
        return output
    if parameterization == "eps":
        return (z - s * output) / a
    raise ValueError(f"parameterization {parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}")


def output_from_x(x: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, parameterization: str) -> torch.Tensor:
    """Inverse of x_from_output: the v, x or eps that gives x at z_t."""
    a, s = _column(alpha, z), _column(sigma, z)
    if parameterization == "v":  # v = alpha eps - sigma x with eps = (z - alpha x) / sigma
        return (a * z - x) / s
    if parameterization == "x":
        return x
    if parameterization == "eps":
        return (z - a * x) / s
    raise ValueError(f"parameterization {parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}")


def stage_times(index: torch.Tensor, student_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, t', t'') = ((i+1)/N, (i+0.5)/N, i/N) in float64 for student step indices i in 0..N-1."""
    i = index.to(torch.float64)
    return (i + 1) / student_steps, (i + 0.5) / student_steps, i / student_steps


def distillation_target(
    z_t: torch.Tensor, z_end: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor, alpha_end: torch.Tensor, sigma_end: torch.Tensor
) -> torch.Tensor:
    """x_tilde such that one DDIM step from (z_t, t) with x_hat = x_tilde gives z_end at t''.

    The ratio and the denominator are formed in float64 (the denominator, sigma_end (sqrt SNR_end -
    sqrt SNR_t), is small for fine grids); at t'' = 0 the result is z_end itself.
    """
    ratio = sigma_end.to(torch.float64) / sigma_t.to(torch.float64)
    denominator = alpha_end.to(torch.float64) - ratio * alpha_t.to(torch.float64)
    return (z_end - _column(ratio, z_t) * z_t) / _column(denominator, z_t)


def loss_weight(name: str, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample weight [B] (float32) on the x-space MSE."""
    snr = (alpha.to(torch.float64) / sigma.to(torch.float64)) ** 2
    if name == "snr_trunc":
        return torch.clamp(snr, min=1.0).float()
    if name == "snr_plus_one":
        return (snr + 1.0).float()
    raise ValueError(f"loss weight {name!r} is not one of {', '.join(LOSS_WEIGHTS)}")


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def stage_step_counts(start_steps: int, end_steps: int) -> list[int]:
    """The students' step counts: start/2, start/4, ..., end (the teacher samples with `start_steps`)."""
    for name, value in (("distill.start_steps", start_steps), ("distill.end_steps", end_steps)):
        if not is_power_of_two(value):
            raise ValueError(f"{name}={value!r} must be a power of two (1, 2, 4, ...)")
    if end_steps >= start_steps:
        raise ValueError(
            f"distill.end_steps={end_steps} must be smaller than distill.start_steps={start_steps} "
            "(each stage halves the number of sampling steps)"
        )
    counts, n = [], start_steps
    while n > end_steps:
        n //= 2
        counts.append(n)
    return counts

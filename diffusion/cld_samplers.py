"""Samplers for CLD: SSCS, reverse-SDE Euler-Maruyama and the probability-flow ODE.

Dockhorn, Vahdat & Kreis, ICLR 2022 (arXiv 2112.07068), Sec. 3 and App. D (SSCS); official
code CLD-SGM `sampling.py` (`get_sscs_sampler`, `get_em_sampler`, `get_ode_sampler`) and
`sde_lib.py` (`CLD.get_reverse_sde`). Every sampler integrates in reverse time from t = 1 down to
t = cld.sampling_eps and then, like the official samplers with `denoising = true`, takes one
noise-free Euler step of the reverse SDE from t = eps to t = 0 (the "denoising step").

Interface shared by all samplers:
- score(x, v, t, rows=None) -> grad_v log p_t(x, v), t a float64 tensor [B] of forward times (one
  per row); the adaptive ODE solver gives every row its own t and calls score on the rows still
  running, naming them: `rows` is then their indices in the batch (a class-conditional score
  needs them to pick the labels), None means all rows in order;
- x, v: the prior draw, x ~ N(0, I) and v ~ N(0, M I) (the caller draws them, so that image i
  can come from its own generator); any shape [B, ...]; the state is kept in x's dtype;
- noise(shape) -> standard normal tensor: every random draw goes through it, one call per draw
  and always for the whole batch, so a row's result depends on its own noise only;
- they return (x, v) at t = 0 as float32 tensors: x is the sample, v the auxiliary velocity.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

from diffusion.cld import CLD, propagator, transition_covariance
from diffusion.dormand_prince import integrate, rows_view as _rows

Score = Callable[..., torch.Tensor]  # score(x, v, t, rows=None)
Noise = Callable[[Sequence[int]], torch.Tensor]


def _check_state(x: torch.Tensor, v: torch.Tensor) -> None:
    if x.shape != v.shape or x.dim() < 1:
        raise ValueError(f"x and v must have the same shape [B, ...], got {tuple(x.shape)} and {tuple(v.shape)}")


STRIDINGS = ("linear", "quadratic")


def sde_time_grid(cld: CLD, steps: int, denoise: bool = True, striding: str = "linear") -> torch.Tensor:
    """The forward times t_0 = 1 > ... > t_n = sampling_eps (float64) of SSCS and Euler-Maruyama.

    As in the official samplers, `steps` counts score evaluations: with the denoising step there
    are steps - 1 intervals (the last evaluation is the denoising step), else steps. In reverse
    time r = 1 - t the official grid is r_k = linspace(0, 1 - eps, n + 1) ("linear" striding) or
    r_k = (1 - eps)(1 - (1 - k/n)^2) ("quadratic": steps shrinking linearly toward the data, where
    the score is stiff; the last one is (1 - eps)/n^2). Both are returned as t = 1 - r.
    """
    intervals = steps - 1 if denoise else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or intervals < 1:
        raise ValueError(f"need an integer steps >= {2 if denoise else 1}, got {steps!r}")
    if striding not in STRIDINGS:
        raise ValueError(f"unknown striding {striding!r}; use one of {', '.join(STRIDINGS)}")
    end = 1.0 - cld.sampling_eps
    reverse = torch.linspace(0.0, end, intervals + 1, dtype=torch.float64)
    if striding == "quadratic":
        reverse = end * (1.0 - (1.0 - reverse / end) ** 2)
    return 1.0 - reverse


def _reverse_drift(
    cld: CLD, x: torch.Tensor, v: torch.Tensor, score: torch.Tensor, score_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """d(x, v)/ds in reverse time s = 1 - t: -f(u) + score_weight G G^T grad_u log p_t(u).

    G G^T = diag(0, 2 Gamma beta), so only the velocity score enters. score_weight is 1 for
    the reverse SDE and 1/2 for the probability-flow ODE (official `get_reverse_sde`).
    """
    beta, m_inv, gam = cld.beta, 1.0 / cld.mass, cld.damping
    dx = -beta * m_inv * v
    dv = beta * x + gam * beta * m_inv * v + score_weight * 2.0 * gam * beta * score
    return dx, dv


def _denoise(cld: CLD, score: Score, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One noise-free Euler step of the reverse SDE from t = eps to t = 0 (official `denoising_fn`).

    It removes the O(eps) noise the process still holds at t = eps; the official code takes the
    mean of an Euler-Maruyama step (`u_mean`), i.e. this step without its noise, for all samplers.
    """
    t = torch.full((x.shape[0],), cld.sampling_eps, dtype=torch.float64, device=x.device)
    dx, dv = _reverse_drift(cld, x, v, score(x, v, t).to(x.dtype), 1.0)
    return x + cld.sampling_eps * dx, v + cld.sampling_eps * dv


def _analytic_half_step(
    cld: CLD, x: torch.Tensor, v: torch.Tensor, ds: torch.Tensor, noise: Noise
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact solution over reverse time ds of the linear part of the reverse SDE (SSCS's "A" step).

    Writing the velocity score as -v/M + (score + v/M), the reverse SDE splits into
        dx = -beta M^-1 v ds,  dv = (beta x - Gamma beta M^-1 v) ds + sqrt(2 Gamma beta) dW
    plus the score part dv = 2 Gamma beta (score + v/M) ds. The first is the forward CLD in
    (-x, v) and is solved exactly by its Gaussian transition from a fixed start: mean phi(b),
    covariance Sigma_rest(b) with b = beta ds (signs of the x-v couplings flipped). Two noise
    draws (x then v) through the Cholesky factor, as official `analytical_dynamics`.
    """
    b = cld.beta * ds
    phi_xx, phi_xv, phi_vx, phi_vv = propagator(b, cld.damping)
    s_xx, s_xv, s_vv = transition_covariance(b, cld.damping)
    l11 = torch.sqrt(s_xx)
    l21 = -s_xv / l11
    l22 = torch.sqrt(s_vv - l21 * l21)
    z_x = noise(x.shape).to(device=x.device, dtype=x.dtype)
    z_v = noise(x.shape).to(device=x.device, dtype=x.dtype)
    x_new = _rows(phi_xx, x) * x - _rows(phi_xv, x) * v + _rows(l11, x) * z_x
    v_new = -_rows(phi_vx, x) * x + _rows(phi_vv, x) * v + _rows(l21, x) * z_x + _rows(l22, x) * z_v
    return x_new, v_new


def _reverse_sde(cld: CLD, score: Score, x: torch.Tensor, v: torch.Tensor, steps: int, denoise: bool,
                 striding: str, progress: bool, desc: str, step) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop SSCS and Euler-Maruyama share: step(x, v, t [B], h) over `sde_time_grid`'s intervals
    (t the interval's start, h = t_i - t_{i+1} a 0-dim tensor), then the denoising step; float32 (x, v)."""
    _check_state(x, v)
    grid = sde_time_grid(cld, steps, denoise, striding).to(x.device)
    with torch.no_grad():
        for i in tqdm(range(len(grid) - 1), desc=desc, disable=not progress):
            x, v = step(x, v, grid[i].expand(x.shape[0]).clone(), grid[i] - grid[i + 1])
        if denoise:
            x, v = _denoise(cld, score, x, v)
    return x.float(), v.float()


def sscs_sample(
    cld: CLD,
    score: Score,
    x: torch.Tensor,
    v: torch.Tensor,
    steps: int,
    noise: Noise,
    denoise: bool = True,
    progress: bool = False,
    striding: str = "linear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric Splitting CLD Sampler (paper Sec. 3 and App. D; official `get_sscs_sampler`).

    Per interval [t_{i+1}, t_i] of `sde_time_grid` (reverse step h = t_i - t_{i+1}): an exact
    half step h/2 of the linear part, an Euler step h of the score part
    v += h 2 Gamma beta (score(x, v, t_i) + v/M) evaluated at the interval's start t_i as the
    official code does, another exact half step h/2; then the denoising step. The exact solve of
    the stiff linear part is what lets it take large steps; the Euler step on the v-dependent
    score part keeps it first order overall (tests: error ~ 1/steps like Euler-Maruyama, but far
    smaller at few steps). `steps` = score evaluations, denoising included. Returns float32 (x, v).
    """

    def step(x, v, t, h):
        h = h.expand(x.shape[0])
        x, v = _analytic_half_step(cld, x, v, h / 2, noise)
        s = score(x, v, t).to(x.dtype)
        v = v + _rows(h * 2.0 * cld.damping * cld.beta, v) * (s + v / cld.mass)
        return _analytic_half_step(cld, x, v, h / 2, noise)

    return _reverse_sde(cld, score, x, v, steps, denoise, striding, progress, f"sscs{steps}", step)


def euler_maruyama_sample(
    cld: CLD,
    score: Score,
    x: torch.Tensor,
    v: torch.Tensor,
    steps: int,
    noise: Noise,
    denoise: bool = True,
    progress: bool = False,
    striding: str = "linear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler-Maruyama on the reverse SDE, the baseline SSCS is compared with (official `get_em_sampler`).

    Same grid, step count convention and denoising step as `sscs_sample`. Per interval, with the
    score at the interval's start: x += h (-beta M^-1 v),
    v += h (beta x + Gamma beta M^-1 v + 2 Gamma beta score) + sqrt(2 Gamma beta h) z, one draw
    z per step (x gets no noise). Returns float32 (x, v).
    """

    def step(x, v, t, h):
        dx, dv = _reverse_drift(cld, x, v, score(x, v, t).to(x.dtype), 1.0)
        z = noise(x.shape).to(device=x.device, dtype=x.dtype)
        return x + h.item() * dx, v + h.item() * dv + (2.0 * cld.damping * cld.beta * h.item()) ** 0.5 * z

    return _reverse_sde(cld, score, x, v, steps, denoise, striding, progress, f"em{steps}", step)


def _pf_rhs(cld: CLD, score: Score, u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """du/ds of the probability-flow ODE in reverse time s = 1 - t; u = stack((x, v), dim=1)."""
    x, v = u[:, 0].contiguous(), u[:, 1].contiguous()
    dx, dv = _reverse_drift(cld, x, v, score(x, v, 1.0 - s).to(u.dtype), 0.5)
    return torch.stack((dx, dv), dim=1)


def _on_rows(score: Score, rows: Optional[torch.Tensor]) -> Score:
    """The score of a subset of the batch, telling it which rows it sees."""
    return score if rows is None else (lambda x, v, t: score(x, v, t, rows=rows))


def _adaptive_pf(
    cld: CLD, score: Score, u: torch.Tensor, rtol: float, atol: float, max_steps: int, progress: bool
) -> torch.Tensor:
    """Per-sample Dormand-Prince 5(4) (diffusion/dormand_prince.py) from s = 0 to 1 - eps: every row keeps
    its own step size and error control, so a sample's trajectory does not depend on the rest of the batch."""
    rhs = lambda u, s, rows: _pf_rhs(cld, _on_rows(score, rows), u, s)
    return integrate(rhs, u, 1.0 - cld.sampling_eps, rtol, atol, max_steps, progress, desc="pf-ode")


def _fixed_step_pf(cld: CLD, score: Score, u: torch.Tensor, solver: str, steps: int, progress: bool) -> torch.Tensor:
    """Euler, Heun or classical RK4 on `steps` uniform intervals of reverse time [0, 1 - eps]."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"fixed-step solvers need an integer steps >= 1, got {steps!r}")
    grid = torch.linspace(0.0, 1.0 - cld.sampling_eps, steps + 1, dtype=torch.float64, device=u.device)
    batch = u.shape[0]
    for i in tqdm(range(steps), desc=f"pf-{solver}{steps}", disable=not progress):
        s = grid[i].expand(batch)
        h = grid[i + 1] - grid[i]
        k1 = _pf_rhs(cld, score, u, s)
        if solver == "euler":
            u = u + h.item() * k1
        elif solver == "heun":
            k2 = _pf_rhs(cld, score, u + h.item() * k1, s + h)
            u = u + h.item() / 2 * (k1 + k2)
        else:
            k2 = _pf_rhs(cld, score, u + h.item() / 2 * k1, s + h / 2)
            k3 = _pf_rhs(cld, score, u + h.item() / 2 * k2, s + h / 2)
            k4 = _pf_rhs(cld, score, u + h.item() * k3, s + h)
            u = u + h.item() / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return u


def probability_flow_sample(
    cld: CLD,
    score: Score,
    x: torch.Tensor,
    v: torch.Tensor,
    steps: Optional[int] = None,
    noise: Optional[Noise] = None,
    solver: str = "adaptive",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    denoise: bool = True,
    progress: bool = False,
    max_steps: int = 100_000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate the probability-flow ODE from t = 1 to eps, then take the denoising step.

    du/dt = f(u, t) - 1/2 G G^T grad_u log p_t(u) (paper App. B; official `get_ode_sampler`,
    the default `sampling_method` of the official configs), i.e. in reverse time s = 1 - t
        dx/ds = -beta M^-1 v,  dv/ds = beta x + Gamma beta M^-1 v + Gamma beta score(x, v, t).
    solver "adaptive": per-sample Dormand-Prince 5(4) with rtol/atol (official defaults 1e-5;
    `steps` unused); "euler", "heun", "rk4": `steps` uniform intervals (plus one score call for
    denoising). The ODE is stiff near t = eps, where the velocity score is about
    -v / (gamma M + 2 Gamma beta t): on Gaussian test data Euler needs ~100 uniform steps to be
    stable, Heun ~20, RK4 ~10. Deterministic: `noise` is accepted only for a uniform sampler
    signature and never called. max_steps bounds the adaptive solver's step attempts.
    Returns float32 (x, v).
    """
    _check_state(x, v)
    if solver not in ("adaptive", "euler", "heun", "rk4"):
        raise ValueError(f"unknown solver {solver!r}; use 'adaptive', 'euler', 'heun' or 'rk4'")
    del noise
    with torch.no_grad():
        u = torch.stack((x, v), dim=1)
        if solver == "adaptive":
            u = _adaptive_pf(cld, score, u, rtol, atol, max_steps, progress)
        else:
            u = _fixed_step_pf(cld, score, u, solver, steps, progress)
        x, v = u[:, 0], u[:, 1]
        if denoise:
            x, v = _denoise(cld, score, x, v)
    return x.float(), v.float()

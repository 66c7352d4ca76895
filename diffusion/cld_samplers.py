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

Score = Callable[..., torch.Tensor]  # score(x, v, t, rows=None)
Noise = Callable[[Sequence[int]], torch.Tensor]


def _rows(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient [B] viewed as [B, 1, ...] in `like`'s dtype, to scale [B, ...] tensors."""
    return c.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _check_state(x: torch.Tensor, v: torch.Tensor) -> None:
    if x.shape != v.shape or x.dim() < 1:
        raise ValueError(f"x and v must have the same shape [B, ...], got {tuple(x.shape)} and {tuple(v.shape)}")


def sde_time_grid(cld: CLD, steps: int, denoise: bool = True) -> torch.Tensor:
    """The forward times t_0 = 1 > ... > t_n = sampling_eps (float64) of SSCS and Euler-Maruyama.

    As in the official samplers, `steps` counts score evaluations: with the denoising step there
    are steps - 1 uniform intervals (the last evaluation is the denoising step), else steps.
    The grid is 1 - linspace(0, 1 - eps, n + 1), the official reverse-time grid mapped to t.
    """
    intervals = steps - 1 if denoise else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or intervals < 1:
        raise ValueError(f"need an integer steps >= {2 if denoise else 1}, got {steps!r}")
    return 1.0 - torch.linspace(0.0, 1.0 - cld.sampling_eps, intervals + 1, dtype=torch.float64)


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
                 progress: bool, desc: str, step) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop SSCS and Euler-Maruyama share: step(x, v, t [B], h) over `sde_time_grid`'s intervals
    (t the interval's start, h = t_i - t_{i+1} a 0-dim tensor), then the denoising step; float32 (x, v)."""
    _check_state(x, v)
    grid = sde_time_grid(cld, steps, denoise).to(x.device)
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

    return _reverse_sde(cld, score, x, v, steps, denoise, progress, f"sscs{steps}", step)


def euler_maruyama_sample(
    cld: CLD,
    score: Score,
    x: torch.Tensor,
    v: torch.Tensor,
    steps: int,
    noise: Noise,
    denoise: bool = True,
    progress: bool = False,
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

    return _reverse_sde(cld, score, x, v, steps, denoise, progress, f"em{steps}", step)


# Dormand-Prince 5(4) tableau (Dormand & Prince 1980), the method of scipy's RK45, which the
# official code runs through torchdiffeq's `scipy_solver`. The 7th stage is evaluated at the
# accepted 5th-order solution, so it is the next step's first stage (FSAL).
_DP_NODES = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_DP_ERR = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)  # b5 - b4
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


def _pf_rhs(cld: CLD, score: Score, u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """du/ds of the probability-flow ODE in reverse time s = 1 - t; u = stack((x, v), dim=1)."""
    x, v = u[:, 0].contiguous(), u[:, 1].contiguous()
    dx, dv = _reverse_drift(cld, x, v, score(x, v, 1.0 - s).to(u.dtype), 0.5)
    return torch.stack((dx, dv), dim=1)


def _row_rms(u: torch.Tensor) -> torch.Tensor:
    """Root mean square of each row (float64 [B]): the per-sample norm of the error control."""
    return u.to(torch.float64).flatten(1).pow(2).mean(dim=1).sqrt()


def _initial_step(cld: CLD, score: Score, u: torch.Tensor, f0: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """Per-row first step from the local scale of u and u' (Hairer, Norsett & Wanner, Sec. II.4)."""
    scale = atol + rtol * u.abs()
    d0, d1 = _row_rms(u / scale), _row_rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
    s = torch.zeros_like(h0)
    f1 = _pf_rhs(cld, score, u + _rows(h0, u) * f0, s + h0)
    d2 = _row_rms((f1 - f0) / scale) / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, torch.clamp_min(h0 * 1e-3, 1e-6), (0.01 / big.clamp_min(1e-300)) ** (1 / 5))
    return torch.minimum(100 * h0, h1)


def _on_rows(score: Score, rows: torch.Tensor) -> Score:
    """The score of a subset of the batch, telling it which rows it sees."""
    return lambda x, v, t: score(x, v, t, rows=rows)


def _adaptive_pf(
    cld: CLD, score: Score, u: torch.Tensor, rtol: float, atol: float, max_steps: int, progress: bool
) -> torch.Tensor:
    """Dormand-Prince 5(4) from s = 0 to 1 - eps with a step size and error control per row.

    Every row keeps its own s, h and FSAL stage; each iteration attempts one step on the rows
    still running (only those rows reach `score`). Error norm: per-row RMS of
    err / (atol + rtol max(|u|, |u_new|)), accept when <= 1, new h = h clip(0.9 norm^-1/5, 0.2, 10)
    (no growth right after a rejection), as scipy's RK45 but per sample instead of over the
    whole batch, so a sample's trajectory does not depend on the rest of the batch.
    """
    end = 1.0 - cld.sampling_eps
    batch = u.shape[0]
    s = torch.zeros(batch, dtype=torch.float64, device=u.device)
    k_first = _pf_rhs(cld, score, u, s)
    h = torch.minimum(_initial_step(cld, score, u, k_first, rtol, atol), torch.full_like(s, end))
    rejected = torch.zeros(batch, dtype=torch.bool, device=u.device)
    done = torch.zeros(batch, dtype=torch.bool, device=u.device)
    bar = tqdm(total=end, desc="pf-ode", disable=not progress, bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f}")
    for _ in range(max_steps):
        rows = (~done).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        ur, sr, kr = u[rows], s[rows], k_first[rows]
        part = _on_rows(score, rows)
        remaining = end - sr
        last = remaining <= 1.01 * h[rows]  # stretch a step that would leave a sliver of < 1% of h
        hr = torch.where(last, remaining, h[rows])
        if bool((hr <= 1e-12).any()):
            raise RuntimeError("probability-flow ODE: step size underflow; loosen rtol/atol or check the score")
        hu = _rows(hr, ur)
        stages = [kr]
        for i in range(1, 6):
            ui = ur + hu * sum(a * k for a, k in zip(_DP_A[i], stages))
            stages.append(_pf_rhs(cld, part, ui, sr + _DP_NODES[i] * hr))
        u_new = ur + hu * sum(b * k for b, k in zip(_DP_B5, stages))
        stages.append(_pf_rhs(cld, part, u_new, sr + hr))
        err = hu * sum(e * k for e, k in zip(_DP_ERR, stages))
        norm = _row_rms(err / (atol + rtol * torch.maximum(ur.abs(), u_new.abs())))
        accept = norm <= 1.0
        factor = (_SAFETY * norm.clamp_min(1e-10) ** -0.2).clamp(_MIN_FACTOR, _MAX_FACTOR)
        factor = torch.where(accept & rejected[rows], factor.clamp_max(1.0), factor)  # < 1 when rejected
        at_end = accept & last
        s[rows] = torch.where(accept, torch.where(at_end, torch.full_like(sr, end), sr + hr), sr)
        keep = accept.view(-1, *([1] * (ur.dim() - 1)))
        u[rows] = torch.where(keep, u_new, ur)
        k_first[rows] = torch.where(keep, stages[-1], kr)
        h[rows] = hr * factor
        rejected[rows] = ~accept
        done[rows] = at_end
        bar.update(float(s.min()) - bar.n)
    else:
        raise RuntimeError(f"probability-flow ODE: not finished after {max_steps} step attempts")
    bar.close()
    return u


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

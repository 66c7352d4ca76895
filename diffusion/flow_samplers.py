"""Samplers of flow-matching models: the probability-flow ODE and SiT's family of SDEs with the same marginals.

All in this tool's time (t = 1 noise -> t = 0 data, diffusion/flow_paths.py). The model is given as
velocity(x, t, rows=None) -> v(x, t) = dx_t/dt (t a float64 [B] tensor, one time per row; `rows` names
the rows of the batch it sees when an adaptive solver runs a subset, None = all in order). Every random
draw goes through noise(shape), one call per draw for the whole batch, so a row depends on its own noise
only (per-image generators: methods/flow.py).

Step counts: `steps` is the number of intervals of the time grid, last step included. SiT's ODE with
N grid points is steps = N - 1; REPA's `--num-steps N` is steps = N for both its ODE and its SDE, and
SiT's SDE `--num-sampling-steps N` (N - 1 Euler-Maruyama steps to t = 0.04, then the last step) is steps = N.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

from diffusion.dormand_prince import integrate, rows_view
from diffusion.flow_paths import Interpolant, shift_time

Velocity = Callable[..., torch.Tensor]  # velocity(x, t, rows=None)
Noise = Callable[[Sequence[int]], torch.Tensor]
ODE_SOLVERS = ("euler", "heun", "adaptive")
SDE_SOLVERS = ("euler", "heun")
LAST_STEPS = ("mean", "tweedie", "euler", "none")


def time_grid(start: float, end: float, steps: int, shift: float = 1.0) -> torch.Tensor:
    """float64 [steps + 1] from `start` down to `end`, uniform, then shifted (t' = s t / (1 + (s - 1) t))."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the flow samplers need an integer steps >= 1, got {steps!r}")
    return shift_time(torch.linspace(start, end, steps + 1, dtype=torch.float64), shift)


def ode_fixed(velocity: Velocity, x: torch.Tensor, grid: torch.Tensor, solver: str = "euler",
              progress: bool = False) -> torch.Tensor:
    """Euler or Heun on the grid (REPA's `euler_sampler`: Heun takes no correction on its last step, so it
    costs 2 steps - 1 evaluations). Returns float32."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"fixed-grid ODE solvers are euler and heun, not {solver!r}")
    batch = x.shape[0]
    x = x.float()
    steps = len(grid) - 1
    for i in tqdm(range(steps), desc=f"ode-{solver}{steps}", disable=not progress):
        t, t_next = grid[i].expand(batch).to(x.device), grid[i + 1].expand(batch).to(x.device)
        h = float(grid[i + 1] - grid[i])  # negative: toward the data
        d = velocity(x, t).float()
        x_next = x + h * d
        if solver == "heun" and i < steps - 1:
            x_next = x + h * 0.5 * (d + velocity(x_next, t_next).float())
        x = x_next
    return x


def ode_adaptive(velocity: Velocity, x: torch.Tensor, start: float, end: float, rtol: float = 1e-3,
                 atol: float = 1e-6, progress: bool = False, max_steps: int = 100_000) -> torch.Tensor:
    """Per-sample Dormand-Prince 5(4) (diffusion/dormand_prince.py) from t = start to t = end, SiT's dopri5 with
    its defaults atol 1e-6, rtol 1e-3. Integrated in s = start - t. Returns float32."""

    def rhs(u, s, rows):
        t = (start - s).to(u.device)
        v = velocity(u, t) if rows is None else velocity(u, t, rows=rows)
        return -v.to(u.dtype)

    return integrate(rhs, x.float(), start - end, rtol, atol, max_steps, progress, desc="flow-ode").float()


@dataclass(frozen=True)
class SDESettings:
    """SiT's SDE sampler: D(t) of `form` x `norm`, Euler-Maruyama or Heun, and a last step of `last_step`
    from the grid's end to t = 0 (mean: the drift without noise; tweedie: E[x | x_t]; euler: the ODE's step)."""

    solver: str = "euler"
    form: str = "sigma"
    norm: float = 1.0
    last_step: str = "mean"

    def __post_init__(self):
        if self.solver not in SDE_SOLVERS:
            raise ValueError(f"SDE solvers are {', '.join(SDE_SOLVERS)}, not {self.solver!r}")
        if self.last_step not in LAST_STEPS:
            raise ValueError(f"SDE last steps are {', '.join(LAST_STEPS)}, not {self.last_step!r}")


def sde_sample(velocity: Velocity, path: Interpolant, x: torch.Tensor, grid: torch.Tensor, noise: Noise,
               settings: SDESettings = SDESettings(), progress: bool = False) -> torch.Tensor:
    """Reverse-time SDE from grid[0] to grid[-2], then the last step from grid[-2] to grid[-1] = 0 (or, with
    last_step none, every interval is a stochastic step).

    In the direction of sampling (t decreasing by h > 0) the SDE with the ODE's marginals is
        dx = [-v(x, t) + D(t) score(x, t)] h + sqrt(2 D(t) h) z,   score from v (flow_paths.py);
    this is SiT's `sde` with its `sde_drift` and `compute_diffusion`, and for the linear path with D = sigma = t
    it is REPA's `euler_maruyama_sampler` (diffusion 2t, drift v - t score in its signs). Returns float32.
    """
    batch = x.shape[0]
    x = x.float()
    stochastic = len(grid) - 1 if settings.last_step == "none" else len(grid) - 2

    def times(i):
        return grid[i].expand(batch).to(x.device)

    def drift(x, t):
        v = velocity(x, t).float()
        diffusion = rows_view(path.diffusion(t, settings.form, settings.norm), x)
        return -v + diffusion * path.score_from_velocity(v, x, t)

    for i in tqdm(range(stochastic), desc=f"sde-{settings.solver}{len(grid) - 1}", disable=not progress):
        t, h = times(i), float(grid[i] - grid[i + 1])
        scale = rows_view((2.0 * path.diffusion(t, settings.form, settings.norm) * h).sqrt(), x)
        z = noise(x.shape).to(device=x.device, dtype=x.dtype)
        if settings.solver == "euler":
            x = x + h * drift(x, t) + scale * z
        else:  # SiT's Heun: the noise first, then a Heun step of the drift
            x_hat = x + scale * z
            k1 = drift(x_hat, t)
            k2 = drift(x_hat + h * k1, times(i + 1))
            x = x_hat + 0.5 * h * (k1 + k2)
    if settings.last_step != "none":
        x = last_step(velocity, path, x, times(len(grid) - 2), float(grid[-2] - grid[-1]), settings, drift)
    return x


def last_step(velocity: Velocity, path: Interpolant, x: torch.Tensor, t: torch.Tensor, h: float,
              settings: SDESettings, drift) -> torch.Tensor:
    """SiT's last step from t to 0 without noise (its `__get_last_step`)."""
    if settings.last_step == "mean":
        return x + h * drift(x, t)
    v = velocity(x, t).float()
    if settings.last_step == "euler":
        return x - h * v
    alpha, sigma = path.alpha_sigma(t)  # tweedie: E[x_0 | x_t] = (x_t + sigma^2 score) / alpha
    return (x + rows_view(sigma**2, x) * path.score_from_velocity(v, x, t)) / rows_view(alpha, x)


def ode_interval(path: str, prediction: str, eps: float) -> tuple[float, float]:
    """(start, end) of the ODE, as SiT's `check_interval` in our time: 1 -> 0 for velocity on linear/gvp,
    1 - eps -> eps for noise/score there, 1 -> eps for vp."""
    if path == "vp":
        return 1.0, eps
    if prediction != "velocity":
        return 1.0 - eps, eps
    return 1.0, 0.0


def sde_interval(path: str, prediction: str, form: str, eps: float, last_step: str,
                 last_step_size: float) -> tuple[float, float]:
    """(start, end of the stochastic steps) of the SDE, as SiT's `check_interval` with sde=True: on linear/gvp
    it starts eps below the noise for the SBDM form (infinite at t = 1) or a noise/score model; it ends at
    last_step_size when there is a last step, else at eps (0 for velocity on linear/gvp)."""
    start = 1.0 if path == "vp" or (form != "sbdm" and prediction == "velocity") else 1.0 - eps
    if last_step != "none":
        return start, last_step_size
    return start, (0.0 if path != "vp" and prediction == "velocity" else eps)


def sde_grid(start: float, end: float, steps: int, last_step: str, shift: float = 1.0) -> torch.Tensor:
    """The SDE's grid: steps - 1 intervals from start to end, then the last step to 0 (steps intervals in all);
    without a last step, `steps` intervals from start to end."""
    if last_step == "none":
        return time_grid(start, end, steps, shift)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"the SDE sampler with a last step needs steps >= 2 (the last step included), got {steps!r}")
    return torch.cat([time_grid(start, end, steps - 1, shift), torch.zeros(1, dtype=torch.float64)])


def network_evaluations(sampler: str, solver: str, steps: int, last_step: str = "mean") -> Optional[int]:
    """Network evaluations per image of a fixed-grid flow sampler (x 2 rows with guidance); None for adaptive."""
    if sampler == "ode":
        return {"euler": steps, "heun": 2 * steps - 1}.get(solver)
    stochastic = steps if last_step == "none" else steps - 1
    last = 0 if last_step == "none" else 1
    return (stochastic if solver == "euler" else 2 * stochastic) + last

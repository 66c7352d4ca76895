"""Per-sample adaptive Dormand-Prince 5(4): one ODE solver for every probability-flow sampler (CLD, flow).

Dormand & Prince (1980), the method of scipy's RK45 and of torchdiffeq's `dopri5`, which the official
CLD and SiT code call. Unlike those, each row of the batch keeps its own time, step size, error
control and FSAL stage, so a sample's trajectory (and the number of network evaluations it needs)
does not depend on the rest of the batch: the .npz is the same for any batch size.

rhs(u, s, rows) -> du/ds for the rows `rows` of the batch (indices into the batch, or None for all
rows in order), u [R, ...] and s [R] float64; the solver integrates every row from s = 0 to `end`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm import tqdm

Rhs = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

# The tableau. The 7th stage is evaluated at the accepted 5th-order solution, so it is the next step's
# first stage (FSAL).
_NODES = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_ERR = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)  # b5 - b4
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


def rows_view(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient [B] viewed as [B, 1, ...] in `like`'s dtype, to scale [B, ...] tensors."""
    return c.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def row_rms(u: torch.Tensor) -> torch.Tensor:
    """Root mean square of each row (float64 [B]): the per-sample norm of the error control."""
    return u.to(torch.float64).flatten(1).pow(2).mean(dim=1).sqrt()


def initial_step(rhs: Rhs, u: torch.Tensor, f0: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """Per-row first step from the local scale of u and u' (Hairer, Norsett & Wanner, Sec. II.4)."""
    scale = atol + rtol * u.abs()
    d0, d1 = row_rms(u / scale), row_rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
    f1 = rhs(u + rows_view(h0, u) * f0, h0, None)
    d2 = row_rms((f1 - f0) / scale) / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, torch.clamp_min(h0 * 1e-3, 1e-6), (0.01 / big.clamp_min(1e-300)) ** (1 / 5))
    return torch.minimum(100 * h0, h1)


def integrate(rhs: Rhs, u: torch.Tensor, end: float, rtol: float, atol: float, max_steps: int = 100_000,
              progress: bool = False, desc: str = "ode") -> torch.Tensor:
    """u at s = `end` for every row, starting from s = 0 (the state keeps u's dtype).

    Each iteration attempts one step on the rows still running (only those rows reach `rhs`). Error
    norm: per-row RMS of err / (atol + rtol max(|u|, |u_new|)), accept when <= 1, new h = h clip(0.9
    norm^-1/5, 0.2, 10) (no growth right after a rejection), as scipy's RK45 but per sample.
    max_steps bounds the step attempts.
    """
    u = u.clone()
    batch = u.shape[0]
    s = torch.zeros(batch, dtype=torch.float64, device=u.device)
    k_first = rhs(u, s, None)
    h = torch.minimum(initial_step(rhs, u, k_first, rtol, atol), torch.full_like(s, end))
    rejected = torch.zeros(batch, dtype=torch.bool, device=u.device)
    done = torch.zeros(batch, dtype=torch.bool, device=u.device)
    bar = tqdm(total=end, desc=desc, disable=not progress, bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f}")
    for _ in range(max_steps):
        rows = (~done).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        ur, sr, kr = u[rows], s[rows], k_first[rows]
        remaining = end - sr
        last = remaining <= 1.01 * h[rows]  # stretch a step that would leave a sliver of < 1% of h
        hr = torch.where(last, remaining, h[rows])
        if bool((hr <= 1e-12).any()):
            raise RuntimeError(f"{desc}: step size underflow; loosen rtol/atol or check the model")
        hu = rows_view(hr, ur)
        stages = [kr]
        for i in range(1, 6):
            ui = ur + hu * sum(a * k for a, k in zip(_A[i], stages))
            stages.append(rhs(ui, sr + _NODES[i] * hr, rows))
        u_new = ur + hu * sum(b * k for b, k in zip(_B5, stages))
        stages.append(rhs(u_new, sr + hr, rows))
        err = hu * sum(e * k for e, k in zip(_ERR, stages))
        norm = row_rms(err / (atol + rtol * torch.maximum(ur.abs(), u_new.abs())))
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
        raise RuntimeError(f"{desc}: not finished after {max_steps} step attempts")
    bar.close()
    return u

"""Classifier-free guidance in DiT's convention (Ho & Salimans 2022; spec section 4 "DiT classifier-free guidance").

eps_guided = eps_u + s (eps_c - eps_u), with the unconditional prediction taken from the null
class label `num_classes` (DiT's LabelEmbedder has num_classes + 1 rows).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def guided_model_fn(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    cfg_scale: float | torch.Tensor,
    num_classes: int,
    all_channels: bool = False,
    interval: Optional[tuple] = None,
    time_of: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """fn(x, t) -> model output for the B rows of x, guided with scale `cfg_scale`.

    cfg_scale == 1: a plain conditional forward model(x, t, y). Otherwise ONE batched forward
    on cat([x, x]) with labels cat([y, null]) and t duplicated; guidance is applied to the first
    min(3, C) eps channels (C = x.shape[1], the latent channels), or to all C eps channels when
    `all_channels`. The remaining eps channels and all variance channels are the conditional ones.

    Why this equals DiT's `forward_with_cfg` for the conditional half: DiT samples a doubled
    batch [z, z] with labels [y, null]; forward_with_cfg keeps only x[:B], runs the model on
    [x[:B], x[:B]], guides output channels 0-2 and returns the guided eps for both halves
    followed by each half's own remaining channels. So the conditional half's output is
    [guided eps 0-2, conditional channels 3+], and it depends on x[:B] only: the unconditional
    half of DiT's batch never influences the conditional half. Returning exactly those B rows
    therefore reproduces DiT's conditional trajectory at half the sampler work. (For C = 4
    latent channels, min(3, C) = 3 is DiT's hard-coded 3; for C < 3 we do not guide variance
    channels, which DiT's slicing would.)

    `cfg_scale` may also be a [B] tensor, one scale per row (guided distillation draws them).

    Guidance interval (Kynkaanniemi et al. 2024): with `interval` = (lo, hi), a row is guided only
    while its time u = time_of(t) (the method's time in [0, 1], 1 = noise) lies in [lo, hi]; rows
    outside get the plain conditional output, and only the rows inside have an unconditional copy
    in the batch, so outside the interval the network runs once per row (no doubled batch). Rows
    may have different times (per-sample adaptive solvers).
    """
    if y.ndim != 1:
        raise ValueError(f"labels y must have shape [B], got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes} ({num_classes} is the null class)")
    if isinstance(cfg_scale, torch.Tensor):
        if cfg_scale.shape != y.shape:
            raise ValueError(f"per-row cfg scales must have shape {tuple(y.shape)}, got {tuple(cfg_scale.shape)}")
        scales = cfg_scale.float()
    else:
        if float(cfg_scale) == 1.0:
            return lambda x, t: model(x, t, y)
        scales = torch.full(y.shape, float(cfg_scale), device=y.device)
    if interval is not None and time_of is None:
        raise ValueError("a guidance interval needs time_of, the map from the network's t to the method's time")
    null = torch.full_like(y, num_classes)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[0], x.shape[1]
        if batch != y.shape[0]:
            raise ValueError(f"x has {batch} rows but {y.shape[0]} labels were given")
        if t.ndim == 0:
            t = t.expand(batch)
        if interval is None:
            rows = None  # every row guided: the doubled batch [x, x]
        else:
            u = time_of(t)
            rows = ((u >= interval[0]) & (u <= interval[1])).nonzero().squeeze(1)
            if rows.numel() == 0:
                return model(x, t, y)
            if rows.numel() == batch:
                rows = None
        pick = (lambda v: v) if rows is None else (lambda v: v[rows])
        out = model(torch.cat([x, pick(x)]), torch.cat([t, pick(t)]), torch.cat([y, pick(null)])).float()
        cond, uncond = out[:batch], out[batch:]
        guided = channels if all_channels else min(3, channels)
        scale = pick(scales).to(out.device).view(-1, *([1] * (out.dim() - 1)))
        mixed = uncond[:, :guided] + scale * (pick(cond)[:, :guided] - uncond[:, :guided])
        if rows is None:
            return torch.cat([mixed, cond[:, guided:]], dim=1)
        result = cond.clone()
        result[rows, :guided] = mixed
        return result

    return fn

"""Classifier-free guidance in DiT's convention (Ho & Salimans 2022; spec section 4 "DiT classifier-free guidance").

eps_guided = eps_u + s (eps_c - eps_u), with the unconditional prediction taken from the null
class label `num_classes` (DiT's LabelEmbedder has num_classes + 1 rows).
"""
from __future__ import annotations

from typing import Callable

import torch


def guided_model_fn(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    cfg_scale: float | torch.Tensor,
    num_classes: int,
    all_channels: bool = False,
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
    """
    if y.ndim != 1:
        raise ValueError(f"labels y must have shape [B], got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes} ({num_classes} is the null class)")
    if isinstance(cfg_scale, torch.Tensor):
        if cfg_scale.shape != y.shape:
            raise ValueError(f"per-row cfg scales must have shape {tuple(y.shape)}, got {tuple(cfg_scale.shape)}")
        scale = cfg_scale.float().view(-1, 1, 1, 1)
    else:
        scale = float(cfg_scale)
        if scale == 1.0:
            return lambda x, t: model(x, t, y)

    labels = torch.cat([y, torch.full_like(y, num_classes)])

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[0], x.shape[1]
        if batch != y.shape[0]:
            raise ValueError(f"x has {batch} rows but {y.shape[0]} labels were given")
        out = model(torch.cat([x, x]), torch.cat([t, t]), labels).float()
        cond, uncond = out[:batch], out[batch:]
        guided = channels if all_channels else min(3, channels)
        eps = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])
        return torch.cat([eps, cond[:, guided:]], dim=1)

    return fn

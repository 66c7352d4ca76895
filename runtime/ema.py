"""Exponential moving average of model weights (DiT: decay 0.9999, updated every step)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def create_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` in eval mode (DiT starts the EMA equal to the model)."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    ema.eval()
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter, in one foreach kernel (of a sharded model
    and its sharded EMA: each process's shards, no gathering)."""
    from runtime.parallel import local

    ema_params = [local(p) for p in ema.parameters()]
    model_params = [local(p) for p in model.parameters()]
    if len(ema_params) != len(model_params):
        raise ValueError("EMA and model have different parameter lists")
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)

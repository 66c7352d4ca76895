"""Training methods behind one seam (methods/base.py), and how each one's checkpoints sample.

`train` builds the method named by `model.method`; `distill` builds methods.distill itself.
A checkpoint records its method under "method" (published DiT checkpoints have none: they are
diffusion models), which picks the sampler for `sample` and `inference`.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from methods import diffusion, distill

TRAINABLE = {"diffusion": diffusion}  # model.method -> module with build(cfg, model, device)
SAMPLING = {"diffusion": diffusion, "distill": distill}  # checkpoint "method" -> module with generation_sampler


def build_method(cfg: DictConfig, model: nn.Module, device: torch.device):
    name = cfg.model.method
    if name not in TRAINABLE:
        raise ValueError(f"model.method={name!r} is not one of {', '.join(TRAINABLE)}")
    return TRAINABLE[name].build(cfg, model, device)


def checkpoint_method(checkpoint: dict) -> str:
    """The method that wrote a loaded checkpoint ("diffusion" for published and older ones)."""
    name = checkpoint.get("method", "diffusion") if isinstance(checkpoint, dict) else "diffusion"
    if name not in SAMPLING:
        raise ValueError(f"the checkpoint was written by method {name!r}, which this version cannot sample")
    return name


def generation_sampler(cfg: DictConfig, model: nn.Module, model_args: dict, checkpoint: dict, settings: DictConfig):
    """sample(noise, y, generators, progress) -> latents for this checkpoint's method and the sampler settings."""
    module = SAMPLING[checkpoint_method(checkpoint)]
    return module.generation_sampler(cfg, model, model_args, checkpoint, settings)

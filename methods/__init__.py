"""Training methods behind one seam (methods/base.py), and how each one's checkpoints sample.

`train` builds the method named by `model.method`; `distill` builds methods.distill itself.
A checkpoint records its method under "method" (published DiT checkpoints have none: they are
diffusion models), which picks the sampler for `sample` and `inference`.

A trainable method is one module with `model_args(cfg, margs)` (how it adapts the DiT),
`build(cfg, model, device)`, `metadata(cfg)` (what its checkpoints must carry to be sampled),
`flops_per_image(cfg, margs)` (model FLOPs of one training update per image, for MFU),
`generation_sampler(...)` and `describe_sampler(checkpoint, settings)`.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from methods import cld, ddgan, diffusion, distill

TRAINABLE = {"diffusion": diffusion, "ddgan": ddgan, "cld": cld}  # model.method -> module
SAMPLING = {"diffusion": diffusion, "distill": distill, "ddgan": ddgan, "cld": cld}  # checkpoint "method" -> module


def _trainable(cfg: DictConfig):
    name = cfg.model.method
    if name not in TRAINABLE:
        raise ValueError(f"model.method={name!r} is not one of {', '.join(TRAINABLE)}")
    return TRAINABLE[name]


def method_model_args(cfg: DictConfig, margs: dict) -> dict:
    """The DiT arguments of model.method's network, from those the cache implies."""
    return _trainable(cfg).model_args(cfg, margs)


def method_metadata(cfg: DictConfig) -> dict:
    """{"method": name, ...what sampling its checkpoints needs}: stored in every checkpoint of `train`."""
    return {"method": cfg.model.method, **_trainable(cfg).metadata(cfg)}


def method_flops_per_image(cfg: DictConfig, margs: dict) -> float:
    return _trainable(cfg).flops_per_image(cfg, margs)


def build_method(cfg: DictConfig, model: nn.Module, device: torch.device):
    return _trainable(cfg).build(cfg, model, device)


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


def describe_sampler(checkpoint: dict, settings: DictConfig) -> str:
    """One line for the console: how this checkpoint will be sampled."""
    return SAMPLING[checkpoint_method(checkpoint)].describe_sampler(checkpoint, settings)

"""Diffusion math: schedules, IDDPM Gaussian diffusion, respacing, guidance and samplers.

`create_diffusion` is the one constructor the phases use (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from typing import Optional

from diffusion.gaussian_diffusion import GaussianDiffusion
from diffusion.respace import SpacedDiffusion, space_timesteps
from diffusion.schedule import get_beta_schedule


def create_diffusion(
    num_steps: int = 1000,
    schedule: str = "linear",
    learn_sigma: bool = True,
    respacing: Optional[str] = None,
    rescale_vb: bool = False,
) -> GaussianDiffusion:
    """The IDDPM diffusion DiT uses: eps prediction, learned-range variance when learn_sigma.

    respacing: None or "" for all `num_steps` steps, else "250", "ddim50" or "a,b,c"
    (see `space_timesteps`), which gives a SpacedDiffusion whose model calls use the
    original timesteps. rescale_vb: IDDPM's num_steps/1000 factor on the VB term (training only;
    DiT does not rescale).
    """
    betas = get_beta_schedule(schedule, num_steps)
    if respacing is None or respacing == "":
        return GaussianDiffusion(betas, learn_sigma=learn_sigma, rescale_vb=rescale_vb)
    return SpacedDiffusion(space_timesteps(num_steps, respacing), betas, learn_sigma=learn_sigma)


__all__ = ["create_diffusion", "GaussianDiffusion", "SpacedDiffusion", "space_timesteps"]

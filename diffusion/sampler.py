"""One entry point for every sampler: build_sampler(name, steps, ...) -> sampler(model_fn, noise, ...).

- "ddpm": IDDPM ancestral sampling with the learned-range variance on the respacing "{steps}"
  (e.g. "250" -> {0, 4, ..., 995, 999}), as DiT's sample.py / sample_ddp.py.
- "ddim": DDIM (Song et al. Eq. 12) with `eta` on the respacing "ddim{steps}" ({0, 20, ..., 980} for 50).
- "dpm++", "unipc", "euler", "diffusers-ddim": diffusers schedulers driven by the eps channels
  (see diffusion/diffusers_adapter.py for their timestep choices and determinism).

The sampler's model_fn(x, t) receives t as a [B] tensor of ORIGINAL timesteps (long for ddpm/ddim,
float for Euler) and returns the full model output. `generators` (one torch.Generator per image)
supply every noise draw row by row, so image i depends only on its own generator.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from diffusion import create_diffusion
from diffusion.diffusers_adapter import DIFFUSERS_SAMPLERS, sample_with_scheduler
from diffusion.schedule import get_beta_schedule

SAMPLERS = ("ddpm", "ddim") + DIFFUSERS_SAMPLERS
_USES_ETA = ("ddim", "diffusers-ddim")


def build_sampler(
    name: str,
    steps: int,
    num_steps: int = 1000,
    schedule: str = "linear",
    learn_sigma: bool = True,
    eta: float = 0.0,
) -> Callable:
    """A callable sampler(model_fn, noise, generators=None, progress=False) -> x_0 (float32)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_steps:
        raise ValueError(f"sampler steps must be an integer in 1..{num_steps}, got {steps!r}")
    if name in ("ddpm", "ddim") and steps < 2:
        raise ValueError(f"the {name} sampler needs at least 2 steps, got {steps}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta != 0 and name not in _USES_ETA:
        raise ValueError(f"eta={eta} only applies to the {' and '.join(_USES_ETA)} samplers, not {name!r}")

    if name == "ddpm":
        return create_diffusion(num_steps, schedule, learn_sigma, respacing=str(steps)).p_sample_loop
    if name == "ddim":
        diffusion = create_diffusion(num_steps, schedule, learn_sigma, respacing=f"ddim{steps}")
        return partial(diffusion.ddim_sample_loop, eta=eta)
    betas = get_beta_schedule(schedule, num_steps)
    return partial(sample_with_scheduler, name, betas, steps, learn_sigma, eta)

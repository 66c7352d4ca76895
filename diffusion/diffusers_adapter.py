"""Drive diffusers schedulers (DPM-Solver++, UniPC, Euler, DDIM) with our eps-prediction model.

The schedulers are built from OUR betas (`trained_betas`, float64 -> diffusers' float32) with
`num_train_timesteps` = our number of steps and prediction_type "epsilon". Timestep choices,
all of which end with a step that lands on t = 0 / sigma = 0 (the clean sample):

- "dpm++" (DPMSolverMultistepScheduler, algorithm "dpmsolver++", order 2, midpoint) and
  "unipc" (UniPCMultistepScheduler, order 2, bh2): timestep_spacing "linspace" starts at
  t = T-1 (the true pure-noise end) and final_sigmas_type "zero" makes the last update go to
  sigma = 0, i.e. return the data prediction.
- "euler" (EulerDiscreteScheduler): "linspace" timesteps are floats (e.g. 978.6); the model
  is called with these float timesteps (DiT's sinusoidal embedder accepts them) on the input
  x / sqrt(sigma^2 + 1) from `scale_model_input`; noise is scaled by `init_noise_sigma`.
  Sigmas end at 0 (final_sigmas_type "zero").
- "diffusers-ddim" (DDIMScheduler): timestep_spacing "leading", steps_offset 0,
  set_alpha_to_one=True, clip_sample=False. For steps dividing T this is exactly our
  "ddim{steps}" grid ({0, 20, ..., 980} for 50), and the last step (t = 0) uses abar_prev = 1,
  so it returns x0_hat like our DDIM.

Determinism: dpm++, unipc and euler (s_churn = 0) draw no noise. diffusers-ddim with eta > 0
draws noise every step; we pass it as `variance_noise`, drawn row by row from the per-image
generators, so each image stays reproducible.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from diffusion.noise import noise_like

DIFFUSERS_SAMPLERS = ("dpm++", "unipc", "euler", "diffusers-ddim")


def make_scheduler(name: str, betas: np.ndarray):
    """A fresh diffusers scheduler for sampler `name` on our betas (fresh: multistep solvers keep state)."""
    import diffusers  # imported here: it is slow to import and only these samplers need it

    common = {
        "num_train_timesteps": len(betas),
        "trained_betas": np.asarray(betas, dtype=np.float64).tolist(),
        "prediction_type": "epsilon",
    }
    if name == "dpm++":
        return diffusers.DPMSolverMultistepScheduler(
            **common,
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
            timestep_spacing="linspace",
            final_sigmas_type="zero",
        )
    if name == "unipc":
        return diffusers.UniPCMultistepScheduler(
            **common, solver_order=2, timestep_spacing="linspace", final_sigmas_type="zero"
        )
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**common, timestep_spacing="linspace", final_sigmas_type="zero")
    if name == "diffusers-ddim":
        return diffusers.DDIMScheduler(
            **common, clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading"
        )
    raise ValueError(f"unknown diffusers sampler {name!r}; expected one of {', '.join(DIFFUSERS_SAMPLERS)}")


def sample_with_scheduler(
    name: str,
    betas: np.ndarray,
    steps: int,
    learn_sigma: bool,
    eta: float,
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    generators: Optional[Sequence[torch.Generator]] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample x_0 from `noise` with diffusers scheduler `name`; the model's eps channels drive it.

    model_fn(x, t) gets t as a [B] tensor of original-scale timesteps (int64, float32 for Euler)
    and returns the full output; only the first C (eps) channels are used.
    """
    if generators is not None and len(generators) != noise.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {noise.shape[0]}; pass one per image")
    scheduler = make_scheduler(name, betas)
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise.float() * scheduler.init_noise_sigma
    batch, channels = x.shape[0], x.shape[1]
    expected = 2 * channels if learn_sigma else channels
    with torch.no_grad():
        for timestep in tqdm(scheduler.timesteps, desc=name, disable=not progress):
            model_input = scheduler.scale_model_input(x, timestep)
            t = timestep.reshape(1).to(x.device).expand(batch)
            output = model_fn(model_input, t).float()
            if output.shape[1] != expected:
                raise ValueError(
                    f"model output has {output.shape[1]} channels, expected {expected} "
                    f"(learn_sigma={learn_sigma}, input channels={channels})"
                )
            eps = output[:, :channels]
            if name == "diffusers-ddim":
                variance_noise = noise_like(x, generators) if eta > 0 else None
                x = scheduler.step(eps, timestep, x, eta=eta, variance_noise=variance_noise, return_dict=False)[0]
            else:
                x = scheduler.step(eps, timestep, x, return_dict=False)[0]
    return x

"""Config -> timestep strategy: validates `diffusion.timesteps`, builds P(t) and w(t) once.

Everything is computed on the 1000-step *training* diffusion (never a respaced one), and tau is
in its steps (spec §1.7.3). Parameters are validated only where the chosen sampler or weighting
uses them; an unknown name or an invalid value raises ValueError naming the config key.

Samplers (`sampler`):
  uniform             P = 1/T (DiT).
  speed               SpeeD asymmetric P with `tau` ("auto" = meaningful_steps, 642 linear) and `k` (spec §1.3).
  speed_legacy        the older public SpeeD code: tanh step at meaningful_steps (k = 5 implied; `tau`, `k`
                      unused). Preset reproducing that code: sampler=speed_legacy weighting=p2 p2_k=1
                      p2_gamma=1 dual=true (spec §1.3, §1.5 "older version").
  lognormal           EDM: ln sigma ~ N(mean, std^2) on the grid via log SNR. EDM's values are mean=-1.2,
                      std=1.2; the config defaults (0, 1) are SD3's, so set them explicitly (spec §2).
  logitnormal         SD3: u ~ N(mean, std^2), s = sigmoid(u), via log SNR = -2u (same family as lognormal).
  logitnormal_index   naive t = floor(T sigmoid(u)) (mode at the middle of the index range).
  loss_second_moment  IDDPM loss-aware sampler (`history`, `uniform_prob`) with importance weights.
`dual` (SpeeD dual sampling around meaningful_steps, spec §1.4) applies to speed and speed_legacy
only; the other samplers ignore it.

Weightings (`weighting`), multiplying the eps-MSE: none; speed (`lam`, `tau`; spec §1.5);
p2 (`p2_k`, `p2_gamma`); min_snr (`gamma`, eps form); edm (sigma_data = 0.5). The VB term gets
weight 1 unless `weight_vb` (spec §1.6), always times the loss-aware importance weight.
"""
from __future__ import annotations

import math

import numpy as np

from . import samplers, weightings
from .dual import dual_marginal
from .loss_history import LossHistory
from .speed_threshold import meaningful_steps, resolve_tau
from .strategy import LossAwareStrategy, TableStrategy, TimestepStrategy

KEY = "diffusion.timesteps"
SAMPLERS = (
    "uniform",
    "speed",
    "speed_legacy",
    "lognormal",
    "logitnormal",
    "logitnormal_index",
    "loss_second_moment",
)
WEIGHTINGS = ("none", "speed", "p2", "min_snr", "edm")
DUAL_SAMPLERS = ("speed", "speed_legacy")  # `dual` applies to the SpeeD samplers only (spec §1.4)


def _number(cfg, name: str) -> float:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{KEY}.{name}={value!r} must be a finite number")
    return float(value)


def _training_schedule(diffusion) -> np.ndarray:
    """alphas_cumprod of the training diffusion, checked against num_timesteps."""
    for attr in ("num_timesteps", "alphas_cumprod"):
        if not hasattr(diffusion, attr):
            raise ValueError(f"the diffusion passed to build_timestep_strategy has no '{attr}'")
    num_timesteps = int(diffusion.num_timesteps)
    if getattr(diffusion, "original_num_steps", num_timesteps) != num_timesteps:
        raise ValueError(
            "build_timestep_strategy needs the un-respaced training diffusion "
            f"({diffusion.original_num_steps} steps), not one respaced to {num_timesteps}"
        )
    abar = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
    if abar.shape != (num_timesteps,):
        raise ValueError(f"alphas_cumprod has shape {abar.shape}, expected ({num_timesteps},)")
    return abar


def _tau(cfg, abar: np.ndarray) -> int:
    return resolve_tau(cfg.tau, abar, key=f"{KEY}.tau")


def sampler_probabilities(cfg, abar: np.ndarray) -> np.ndarray:
    """P(t) of the primary draw for a fixed-table sampler (before dual sampling)."""
    name = cfg.sampler
    num_timesteps = abar.size
    if name == "uniform":
        return samplers.uniform_probabilities(num_timesteps)
    if name == "speed":
        k = _number(cfg, "k")
        if k <= 0:
            raise ValueError(f"{KEY}.k={k} must be positive (SpeeD suppression intensity)")
        return samplers.speed_probabilities(num_timesteps, _tau(cfg, abar), k)
    if name == "speed_legacy":
        return samplers.speed_legacy_probabilities(abar)
    mean, std = _number(cfg, "mean"), _number(cfg, "std")
    if std <= 0:
        raise ValueError(f"{KEY}.std={std} must be positive")
    if name == "lognormal":
        return samplers.lognormal_probabilities(abar, mean, std)
    if name == "logitnormal":
        return samplers.logitnormal_probabilities(abar, mean, std)
    if name == "logitnormal_index":
        return samplers.logitnormal_index_probabilities(num_timesteps, mean, std)
    raise ValueError(f"{KEY}.sampler={name!r} is not one of {', '.join(SAMPLERS)}")


def weighting_table(cfg, abar: np.ndarray) -> np.ndarray:
    """w_t on the eps-MSE, before any normalisation."""
    name = cfg.weighting
    if name == "none":
        return weightings.no_weighting(abar.size)
    if name == "speed":
        lam = _number(cfg, "lam")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"{KEY}.lam={lam} must lie in [0, 1]: SpeeD weights span [1 - lam, lam]")
        return weightings.speed_weights(abar, _tau(cfg, abar), lam)
    if name == "p2":
        p2_k, p2_gamma = _number(cfg, "p2_k"), _number(cfg, "p2_gamma")
        if p2_k < 0:
            raise ValueError(f"{KEY}.p2_k={p2_k} must be non-negative")
        if p2_gamma < 0:
            raise ValueError(f"{KEY}.p2_gamma={p2_gamma} must be non-negative")
        return weightings.p2_weights(abar, p2_k, p2_gamma)
    if name == "min_snr":
        gamma = _number(cfg, "gamma")
        if gamma <= 0:
            raise ValueError(f"{KEY}.gamma={gamma} must be positive (min-SNR gamma)")
        return weightings.min_snr_weights(abar, gamma)
    if name == "edm":
        return weightings.edm_weights(abar)
    raise ValueError(f"{KEY}.weighting={name!r} is not one of {', '.join(WEIGHTINGS)}")


def build_timestep_strategy(cfg, diffusion, device) -> TimestepStrategy:
    """The strategy `cfg` (a `diffusion.timesteps` section) describes, tables on `device`.

    `diffusion` is any object with `num_timesteps` and float64 `alphas_cumprod` (the 1000-step
    training diffusion). With `normalize`, weights are divided by E_{t~P}[w_t] under the marginal P
    that training sees: the large-batch dual mixture for SpeeD, and uniform for loss_second_moment
    (its importance weights make the objective an expectation under uniform t).
    """
    abar = _training_schedule(diffusion)
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"{KEY}.sampler={cfg.sampler!r} is not one of {', '.join(SAMPLERS)}")
    if cfg.weighting not in WEIGHTINGS:
        raise ValueError(f"{KEY}.weighting={cfg.weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    weights = weighting_table(cfg, abar)

    if cfg.sampler == "loss_second_moment":
        history = LossHistory(abar.size, history=int(cfg.history), uniform_prob=_number(cfg, "uniform_prob"))
        if cfg.normalize:
            weights = weightings.normalize_weights(weights, samplers.uniform_probabilities(abar.size))
        vb_weights = weights if cfg.weight_vb else np.ones_like(weights)
        return LossAwareStrategy(history, weights, vb_weights, device)

    probabilities = sampler_probabilities(cfg, abar)
    # The dual pivot is meaningful_steps, not the config tau (spec §1.4); clamp keeps dual(0) on the grid.
    dual_pivot = min(meaningful_steps(abar), abar.size - 1) if cfg.dual and cfg.sampler in DUAL_SAMPLERS else None
    if cfg.normalize:
        marginal = probabilities if dual_pivot is None else dual_marginal(probabilities, dual_pivot)
        weights = weightings.normalize_weights(weights, marginal)
    vb_weights = weights if cfg.weight_vb else np.ones_like(weights)
    return TableStrategy(cfg.sampler, probabilities, weights, vb_weights, device, dual_pivot=dual_pivot)

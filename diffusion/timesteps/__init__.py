"""Timestep samplers and loss weightings for training (uniform, SpeeD, baselines; issue 4).

    strategy = build_timestep_strategy(cfg.diffusion.timesteps, training_diffusion, device)
    t, mse_weight, vb_weight = strategy.sample(batch_size, generator)
    strategy.update(t, per_sample_losses)

Files: `samplers` (P(t) tables), `weightings` (w(t) tables), `dual` (SpeeD dual sampling),
`speed_threshold` (tau), `snr`, `loss_history` (IDDPM loss-aware sampler state),
`strategy` (drawing batches), `build` (config -> strategy).
"""
from .build import SAMPLERS, WEIGHTINGS, build_timestep_strategy
from .strategy import LossAwareStrategy, TableStrategy, TimestepBatch, TimestepStrategy

__all__ = [
    "SAMPLERS",
    "WEIGHTINGS",
    "build_timestep_strategy",
    "LossAwareStrategy",
    "TableStrategy",
    "TimestepBatch",
    "TimestepStrategy",
]

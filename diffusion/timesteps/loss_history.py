"""Loss history for IDDPM's loss-aware timestep sampler (`loss_second_moment`, spec §2).

Keeps the last `history` losses of every timestep. Once every t has `history` entries,
p_t is proportional to sqrt(E[loss_t^2]) over that window, mixed with `uniform_prob` of the
uniform distribution; until then p is uniform. State is plain tensors (float64 losses,
int64 counters) so a checkpoint holding it loads with torch.load(weights_only=True).
"""
from __future__ import annotations

import numpy as np
import torch


class LossHistory:
    """Per-timestep ring buffers of recent losses and the sampling distribution they imply."""

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        if history < 1:
            raise ValueError(f"diffusion.timesteps.history={history} must be at least 1")
        if not 0.0 < uniform_prob <= 1.0:
            raise ValueError(
                f"diffusion.timesteps.uniform_prob={uniform_prob} must lie in (0, 1]; "
                "zero would allow p_t = 0 and an infinite importance weight 1/(T p_t)"
            )
        self.num_timesteps = num_timesteps
        self.history = history
        self.uniform_prob = uniform_prob
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.int64)  # losses ever seen per t

    def warmed_up(self) -> bool:
        """True once every timestep holds a full window of `history` losses."""
        return bool((self.counts >= self.history).all())

    def probabilities(self) -> np.ndarray:
        """p_t (float64 numpy [T]): uniform during warm-up, else sqrt of the mean squared loss, mixed."""
        uniform = np.full(self.num_timesteps, 1.0 / self.num_timesteps)
        if not self.warmed_up():
            return uniform
        second_moment = np.sqrt(np.mean(self.losses.numpy() ** 2, axis=1))
        total = second_moment.sum()
        if not total > 0:  # every recorded loss is zero: nothing to prefer
            return uniform
        return (1.0 - self.uniform_prob) * second_moment / total + self.uniform_prob * uniform

    def add(self, timesteps: np.ndarray, losses: np.ndarray) -> None:
        """Record losses in order; a timestep's oldest entry is overwritten once its window is full."""
        timesteps = np.asarray(timesteps, dtype=np.int64).reshape(-1)
        losses = np.asarray(losses, dtype=np.float64).reshape(-1)
        if timesteps.shape != losses.shape:
            raise ValueError(f"got {timesteps.size} timesteps but {losses.size} losses")
        if timesteps.size and (timesteps.min() < 0 or timesteps.max() >= self.num_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps}), got {timesteps.min()}..{timesteps.max()}"
            )
        if not np.all(np.isfinite(losses)):
            raise ValueError("loss_second_moment received a non-finite loss; refusing to corrupt the history")
        buffer = self.losses.numpy()  # shares memory with the tensor
        counts = self.counts.numpy()
        for t, loss in zip(timesteps.tolist(), losses.tolist()):
            buffer[t, counts[t] % self.history] = loss
            counts[t] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("losses", "counts"):
            if key not in state:
                raise ValueError(f"loss history state has no '{key}' entry (keys: {sorted(state)})")
        losses = torch.as_tensor(state["losses"], dtype=torch.float64)
        counts = torch.as_tensor(state["counts"], dtype=torch.int64)
        if losses.shape != self.losses.shape or counts.shape != self.counts.shape:
            raise ValueError(
                f"loss history of shape {tuple(losses.shape)} does not match T={self.num_timesteps}, "
                f"history={self.history} (expected {tuple(self.losses.shape)})"
            )
        self.losses = losses.cpu().clone()
        self.counts = counts.cpu().clone()

"""Timestep strategies: draw the timesteps of a training batch with their loss weights.

`TableStrategy` serves every fixed distribution (uniform, SpeeD, log-/logit-normal): P(t) and
the weight tables are built once and moved to the training device once, so `sample` does no
host-to-device copy of a table and no host sync. `LossAwareStrategy` is IDDPM's loss-second-
moment sampler, whose P(t) changes with every `update` and is therefore drawn on the host.

Randomness: draws happen on the device of the `generator` passed to `sample` (the training
device's default generator when none is given); with a CPU generator the drawn indices are
moved to the training device, which is what makes runs reproducible across GPU types.
Uniform tables draw with torch.randint, exactly like the DiT reference loop; other tables draw
u ~ U[0, 1) in float64 and invert the CDF (torch.searchsorted).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from runtime import distributed

from .dual import dual_batch, dual_marginal, num_primaries
from .loss_history import LossHistory


class TimestepBatch(NamedTuple):
    """What the training step needs: t [B] long, and the weights on the eps-MSE and VB terms [B] float."""

    t: torch.Tensor
    mse_weight: torch.Tensor
    vb_weight: torch.Tensor


def _resolve_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")


def _cdf_tensor(probabilities: np.ndarray) -> torch.Tensor:
    """Cumulative sum scaled so its last entry is exactly 1 (float64)."""
    cdf = np.cumsum(probabilities)
    return torch.from_numpy(cdf / cdf[-1])


def draw_inverse_cdf(cdf: torch.Tensor, count: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """`count` indices with P(i) = cdf[i] - cdf[i-1], drawn on cdf's device (zero-mass bins never appear)."""
    u = torch.rand(count, generator=generator, device=cdf.device, dtype=torch.float64)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)


class TimestepStrategy:
    """Interface shared by the strategies (docs/ARCHITECTURE.md, diffusion.timesteps)."""

    name: str
    device: torch.device

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> TimestepBatch:
        raise NotImplementedError

    def update(self, t: torch.Tensor, per_sample_losses: torch.Tensor) -> None:
        """Fixed tables learn nothing from the losses: a no-op (and no cross-rank communication)."""

    def state_dict(self) -> dict:
        return {"sampler": self.name}

    def load_state_dict(self, state: dict) -> None:
        """Fixed tables are rebuilt from the config: nothing to restore."""

    def probabilities(self, batch_size: Optional[int] = None) -> np.ndarray:
        raise NotImplementedError

    def weights(self) -> np.ndarray:
        raise NotImplementedError


class TableStrategy(TimestepStrategy):
    """A fixed P(t) (optionally with SpeeD dual sampling) and fixed per-t weight tables."""

    def __init__(
        self,
        name: str,
        probabilities: np.ndarray,
        mse_weights: np.ndarray,
        vb_weights: np.ndarray,
        device,
        dual_pivot: Optional[int] = None,
    ):
        self.name = name
        self.device = _resolve_device(device)
        self._p = np.asarray(probabilities, dtype=np.float64)
        self._mse = np.asarray(mse_weights, dtype=np.float64)
        self._vb = np.asarray(vb_weights, dtype=np.float64)
        self.num_timesteps = self._p.size
        if not (self._mse.shape == self._vb.shape == self._p.shape):
            raise ValueError("probabilities and weight tables must all have shape [T]")
        if dual_pivot is not None and not 0 <= dual_pivot < self.num_timesteps:
            raise ValueError(f"dual pivot {dual_pivot} must lie in [0, {self.num_timesteps})")
        self.dual_pivot = dual_pivot
        self._uniform = bool(np.all(self._p == self._p[0]))
        cdf = _cdf_tensor(self._p)
        self._cdf = {torch.device("cpu"): cdf, self.device: cdf.to(self.device)}  # built and moved once
        self._mse_table = torch.from_numpy(self._mse).float().to(self.device)
        self._vb_table = torch.from_numpy(self._vb).float().to(self.device)

    def _draw(self, count: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        draw_device = self.device if generator is None else _resolve_device(generator.device)
        if draw_device not in self._cdf:
            raise ValueError(f"generator on {draw_device}: use a CPU generator or one on {self.device}")
        if self._uniform:
            return torch.randint(0, self.num_timesteps, (count,), generator=generator, device=draw_device)
        return draw_inverse_cdf(self._cdf[draw_device], count, generator)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> TimestepBatch:
        """t from P (then SpeeD duals when enabled) with the table weights, all on `device`."""
        _check_batch_size(batch_size)
        if self.dual_pivot is None:
            t = self._draw(batch_size, generator).to(self.device)
        else:
            primaries = self._draw(num_primaries(batch_size), generator).to(self.device)
            t = dual_batch(primaries, self.dual_pivot, batch_size)
        return TimestepBatch(t, self._mse_table[t], self._vb_table[t])

    def probabilities(self, batch_size: Optional[int] = None) -> np.ndarray:
        """Marginal P(t) of one batch element.

        With dual sampling this depends on the batch size n: pass it for the exact value, or leave
        it out for the large-n limit (P + D)/2 (D: distribution of the duals; spec §1.4).
        """
        if self.dual_pivot is None:
            return self._p.copy()
        return dual_marginal(self._p, self.dual_pivot, batch_size)

    def weights(self) -> np.ndarray:
        """w_t on the eps-MSE (after normalisation when that is enabled)."""
        return self._mse.copy()


class LossAwareStrategy(TimestepStrategy):
    """IDDPM loss-second-moment sampler with importance weights 1/(T p_t) (spec §2).

    The importance weight multiplies both the MSE and the VB weight, so the expected loss equals
    the uniform-t objective (times the weighting, if one is configured).
    """

    name = "loss_second_moment"

    def __init__(self, history: LossHistory, mse_weights: np.ndarray, vb_weights: np.ndarray, device):
        self.history = history
        self.device = _resolve_device(device)
        self.num_timesteps = history.num_timesteps
        self._mse = np.asarray(mse_weights, dtype=np.float64)
        self._vb = np.asarray(vb_weights, dtype=np.float64)
        if not (self._mse.shape == self._vb.shape == (self.num_timesteps,)):
            raise ValueError(f"weight tables must have shape [{self.num_timesteps}]")

    def _importance(self, p: np.ndarray) -> np.ndarray:
        return 1.0 / (self.num_timesteps * p)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> TimestepBatch:
        """Draw from the current loss-aware p on the generator's device (CPU when none), then move."""
        _check_batch_size(batch_size)
        p = self.history.probabilities()
        draw_device = torch.device("cpu") if generator is None else generator.device
        t = draw_inverse_cdf(_cdf_tensor(p).to(draw_device), batch_size, generator)
        importance = self._importance(p)
        mse = torch.from_numpy(self._mse * importance).float().to(draw_device)[t]
        vb = torch.from_numpy(self._vb * importance).float().to(draw_device)[t]
        return TimestepBatch(t.to(self.device), mse.to(self.device), vb.to(self.device))

    def update(self, t: torch.Tensor, per_sample_losses: torch.Tensor) -> None:
        """Record this step's (t, loss) pairs from every rank, so all ranks keep the same history.

        Pass the per-sample losses before the importance weight (IDDPM records the raw loss),
        e.g. terms["mse"] + terms["vb"]. Every rank must pass the same number of elements.
        Gathers across ranks and syncs with the host.
        """
        t = t.detach().reshape(-1).to(torch.int64)
        losses = per_sample_losses.detach().reshape(-1).to(device=t.device, dtype=torch.float64)
        if t.numel() != losses.numel():
            raise ValueError(f"update got {t.numel()} timesteps but {losses.numel()} losses")
        all_t = distributed.all_gather_tensor(t)
        all_losses = distributed.all_gather_tensor(losses)
        self.history.add(all_t.cpu().numpy(), all_losses.cpu().numpy())

    def state_dict(self) -> dict:
        return {"sampler": self.name, **self.history.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved_by = state.get("sampler")
        if saved_by != self.name:
            raise ValueError(
                f"timestep state was saved by sampler {saved_by!r}, which keeps no loss history; "
                f"cannot resume '{self.name}' from it"
            )
        self.history.load_state_dict(state)

    def probabilities(self, batch_size: Optional[int] = None) -> np.ndarray:
        """The current p_t (uniform until the history is warm); the batch size does not matter."""
        return self.history.probabilities()

    def weights(self) -> np.ndarray:
        """Effective weight on the eps-MSE right now: weighting times the importance weight 1/(T p_t)."""
        return self._mse * self._importance(self.history.probabilities())

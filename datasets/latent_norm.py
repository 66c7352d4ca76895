"""How latents are normalised before the network sees them: z_model = (z - shift) * scale, per channel.

Two kinds, chosen by `autoencoder.normalization`:
  scale    one scale factor for every channel, no shift (the SD VAE's 0.18215, as DiT and SiT);
  channel  the dataset's per-channel mean and std, z_model = (z - mean_c) / std_c * scale_factor (LightningDiT
           on VA-VAE latents, its `latent_norm` with `latent_multiplier` = scale_factor, 1.0 for VA-VAE).
The per-channel statistics are computed by `extract` over every item and both flips of the cache, for
the posterior samples the training reader draws (mean of the means; variance E[mean^2 + std^2] - mean^2),
and stored in the cache. Every consumer (the training reader, the decoders of sample, inference, the grids
during training and distillation, the FID sweeps) takes the normalisation from the cache or the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

KINDS = ("scale", "channel")


@dataclass(frozen=True)
class LatentNorm:
    """shift and scale: one value (every channel) or one per channel."""

    shift: tuple = (0.0,)
    scale: tuple = (1.0,)

    @classmethod
    def scalar(cls, scale_factor: float) -> "LatentNorm":
        return cls((0.0,), (float(scale_factor),))

    @classmethod
    def from_statistics(cls, mean, std, scale_factor: float = 1.0) -> "LatentNorm":
        mean, std = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (mean, std))
        if mean.shape != std.shape or not (std > 0).all():
            raise ValueError(f"per-channel statistics need equal shapes and std > 0, got {mean.shape}, {std.shape}")
        return cls(tuple(mean.tolist()), tuple((float(scale_factor) / std).tolist()))

    def _views(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (z.dim() - 2)
        shift = torch.tensor(self.shift, dtype=z.dtype, device=z.device).view(shape)
        scale = torch.tensor(self.scale, dtype=z.dtype, device=z.device).view(shape)
        return shift, scale

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents [B, C, ...] -> what the network sees."""
        shift, scale = self._views(z)
        return (z - shift) * scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """What the network generates -> latents for the decoder."""
        shift, scale = self._views(z)
        return z / scale + shift

    def as_dict(self) -> dict:
        return {"shift": list(self.shift), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, value: dict) -> "LatentNorm":
        return cls(tuple(float(v) for v in value["shift"]), tuple(float(v) for v in value["scale"]))

    @property
    def per_channel(self) -> bool:
        return len(self.scale) > 1 or self.shift != (0.0,)

    def describe(self) -> str:
        if not self.per_channel:
            return f"scale factor {self.scale[0]:g}"
        return f"per-channel mean/std of {len(self.scale)} channels"


class ChannelMoments:
    """Running per-channel mean and variance of the posterior samples of cached moments [n, 2, 2, C, h, w]."""

    def __init__(self):
        self.count = 0
        self.sum = self.sum_sq = None

    def add(self, moments: np.ndarray) -> None:
        block = np.asarray(moments, dtype=np.float64)
        mean, std = block[:, :, 0], block[:, :, 1]  # [n, flips, C, h, w]
        axes = (0, 1, *range(3, mean.ndim))
        if self.sum is None:
            self.sum = np.zeros(mean.shape[2])
            self.sum_sq = np.zeros(mean.shape[2])
        self.sum += mean.sum(axis=axes)
        self.sum_sq += (mean**2 + std**2).sum(axis=axes)
        self.count += mean.size // mean.shape[2]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean [C], std [C]) in float64."""
        mean = self.sum / self.count
        return mean, np.sqrt(np.maximum(self.sum_sq / self.count - mean**2, 0.0))


def read_stats_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) from a file of per-channel statistics: LightningDiT's latents_stats.pt ({"mean", "std"} tensors
    of any shape with C values), read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder.latent_stats={path}: no such file")
    stats = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(stats, dict) or not {"mean", "std"} <= set(stats):
        raise ValueError(f"{path} must hold a dict with 'mean' and 'std' (per-channel statistics)")
    return (torch.as_tensor(stats["mean"]).double().flatten().numpy(),
            torch.as_tensor(stats["std"]).double().flatten().numpy())


def norm_from_cache(kind: str, cache: dict, where: str) -> LatentNorm:
    """The normalisation of `kind` for latents of a cache (read_cache_info): its scale factor, or its statistics."""
    if kind == "scale":
        return LatentNorm.scalar(cache["scale_factor"])
    if kind != "channel":
        raise ValueError(f"autoencoder.normalization={kind!r} is not one of {', '.join(KINDS)}")
    if cache.get("latent_mean") is None:
        raise ValueError(f"the cache {where} has no per-channel latent statistics (made by an older version), which "
                         "autoencoder.normalization=channel needs: re-run -p extract into a new data.cache_path, or use "
                         "autoencoder.normalization=scale")
    return LatentNorm.from_statistics(cache["latent_mean"], cache["latent_std"], cache["scale_factor"])


def autoencoder_entry(cache: dict, norm: LatentNorm) -> dict:
    """What a checkpoint records of its latents: the autoencoder and scale factor, and the per-channel
    normalisation when there is one (what sampling must undo)."""
    entry = {"name": cache["autoencoder"], "scale_factor": float(cache["scale_factor"])}
    if norm.per_channel:
        entry["normalization"] = norm.as_dict()
    return entry


def norm_of_checkpoint(entry: dict) -> LatentNorm | None:
    """The normalisation a checkpoint of this tool was trained with (older ones: their scale factor; None when it
    records none: the autoencoder's own)."""
    if entry.get("normalization"):
        return LatentNorm.from_dict(entry["normalization"])
    return None if entry.get("scale_factor") is None else LatentNorm.scalar(entry["scale_factor"])

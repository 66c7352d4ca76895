"""Per-image Gaussian noise: image i draws only from its own torch.Generator.

This is what makes a sample depend on its seed alone, not on the batch size, the other rows
of the batch or the number of GPUs (DESIGN: image i is generated from seed global_seed + i).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def per_row_noise(
    shape: Sequence[int],
    generators: Optional[Sequence[torch.Generator]],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of `shape`; row i = torch.randn(shape[1:], generator=generators[i]).

    Each row is drawn in float32 on its generator's device and then moved, so the values do
    not depend on where the batch lives. With generators=None the global RNG is used.
    """
    shape = tuple(int(s) for s in shape)
    if generators is None:
        return torch.randn(shape, device=device).to(dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]} rows; pass one per image")
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)


def noise_like(x: torch.Tensor, generators: Optional[Sequence[torch.Generator]]) -> torch.Tensor:
    """per_row_noise with the shape, device and dtype of `x`."""
    return per_row_noise(x.shape, generators, x.device, x.dtype)

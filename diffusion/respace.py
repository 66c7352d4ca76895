"""Timestep respacing for fast sampling (IDDPM Sec. 4, spec section 4 "Respacing").

A respaced process keeps a subset tau of the original steps and gets new betas
beta'_i = 1 - abar[tau_i] / abar[tau_{i-1}], so that its alphas_cumprod equal the original ones
at the kept steps. The model still receives the ORIGINAL timestep index (no rescaling).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from diffusion.gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """The set of original steps to keep.

    - "ddimN": the smallest integer stride s such that range(0, T, s) has exactly N elements
      (ddim50 -> {0, 20, ..., 980}; 999 is not included).
    - "N" or "a,b,c" (or a list of ints): split T into equal sections (the first T % len
      sections one step longer) and take each section's counts evenly spaced by a float
      stride (size - 1) / (count - 1), accumulated and rounded with Python's round at every
      step, exactly as the reference ("250" -> {0, 4, 8, ..., 995, 999}).
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            return _ddim_timesteps(num_timesteps, text[len("ddim"):])
        try:
            section_counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"respacing {section_counts!r} is not 'ddimN', 'N' or comma-separated integers like '10,10,10'"
            ) from None
    elif isinstance(section_counts, (int, np.integer)) and not isinstance(section_counts, bool):
        section_counts = [int(section_counts)]
    section_counts = list(section_counts)
    if not section_counts or any(count < 1 for count in section_counts):
        raise ValueError(f"respacing section counts must be positive integers, got {section_counts}")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"cannot take {count} steps from a section of {size} steps "
                f"(T={num_timesteps}, sections={section_counts})"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


def _ddim_timesteps(num_timesteps: int, count_text: str) -> set[int]:
    try:
        desired = int(count_text)
    except ValueError:
        raise ValueError(f"respacing 'ddim{count_text}': expected an integer after 'ddim'") from None
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
            return set(range(0, num_timesteps, stride))
    possible = sorted({len(range(0, num_timesteps, s)) for s in range(1, num_timesteps)}, reverse=True)
    raise ValueError(
        f"cannot make {desired} DDIM steps with an integer stride over {num_timesteps} steps; "
        f"possible counts include {possible[:12]}..."
    )


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept steps `use_timesteps` of a process with `betas`.

    Index i of this process is original step timestep_map[i]; the model is always called
    with the original step.
    """

    def __init__(self, use_timesteps: Iterable[int], betas: np.ndarray, learn_sigma: bool = True):
        betas = np.asarray(betas, dtype=np.float64)
        kept = sorted(set(int(s) for s in use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= len(betas):
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{len(betas) - 1}")
        alphas_cumprod = np.cumprod(1.0 - betas)
        new_betas = []
        last = 1.0
        for step in kept:
            new_betas.append(1.0 - alphas_cumprod[step] / last)
            last = alphas_cumprod[step]
        self.original_num_steps = len(betas)
        self.timestep_map = np.array(kept, dtype=np.int64)
        super().__init__(np.array(new_betas), learn_sigma)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original step of each index in t (long, on t's device)."""
        key = ("timestep_map", t.device)
        table = self._tables.get(key)
        if table is None:
            table = torch.from_numpy(self.timestep_map).to(t.device)
            self._tables[key] = table
        return table[t]

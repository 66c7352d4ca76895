"""Learning-rate schedule: linear warmup, then constant, cosine or linear decay to `min_lr`."""
from __future__ import annotations

import math


def learning_rate(step: int, base_lr: float, warmup_steps: int, schedule: str, max_steps: int, min_lr: float = 0.0) -> float:
    """LR for optimizer step `step` (0-based). DiT uses a constant 1e-4 with no warmup."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":  # progressive distillation anneals each stage linearly to 0
        return min_lr + (base_lr - min_lr) * (1.0 - progress)
    raise ValueError(f"lr_schedule={schedule!r} is not one of constant, cosine, linear")

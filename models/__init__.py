"""Model registry: `MODELS["DiT-XL/2"]` -> constructor, and `create_model` to build one from the config.

Sizes are those of the DiT paper (Table 1); "T" is a tiny size for CPU demos and tests.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from models.dit import DiT

# size -> (depth, hidden_size, num_heads)
DIT_SIZES = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "T": (6, 128, 4),
}
PATCH_SIZES = (2, 4, 8)

MODELS: dict[str, Callable[..., DiT]] = {
    f"DiT-{size}/{patch}": partial(DiT, depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in DIT_SIZES.items()
    for patch in PATCH_SIZES
}


def create_model(
    name: str,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
    grad_checkpointing: bool = False,
    guidance_embedding: bool = False,
    z_dim: int = 0,
    extra_in_channels: int = 0,
) -> DiT:
    """Build the registered model `name` for latents of shape [in_channels, input_size, input_size]."""
    if name not in MODELS:
        raise ValueError(f"unknown model.name {name!r}; valid names: {', '.join(MODELS)}")
    patch_size = MODELS[name].keywords["patch_size"]
    if input_size < 1 or input_size % patch_size:
        raise ValueError(
            f"{name}: latent input_size {input_size} must be a positive multiple of the patch size {patch_size} "
            "(check data.image_size and the autoencoder's downsampling factor)"
        )
    if in_channels < 1:
        raise ValueError(f"{name}: in_channels must be at least 1, got {in_channels}")
    if z_dim < 0 or extra_in_channels < 0:
        raise ValueError(f"{name}: z_dim and extra_in_channels must be >= 0, got {z_dim}, {extra_in_channels}")
    if num_classes < 1:
        raise ValueError(f"{name}: model.num_classes must be at least 1, got {num_classes}")
    if not 0.0 <= class_dropout_prob <= 1.0:
        raise ValueError(f"{name}: model.class_dropout_prob must be in [0, 1], got {class_dropout_prob}")
    return MODELS[name](
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
        grad_checkpointing=grad_checkpointing,
        guidance_embedding=guidance_embedding,
        z_dim=z_dim,
        extra_in_channels=extra_in_channels,
    )

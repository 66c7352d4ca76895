"""Backbone registry: every model name belongs to a family (DiT, LightningDiT) with the family's sizes, and
`create_model` builds one from the config, wrapped with the methods' extra inputs when they need them.

Sizes are the DiT paper's (Table 1) and LightningDiT's release; "T" is a tiny size for CPU demos and tests.
A model's `model_args` (stored in every checkpoint, compared by equality on resume) name it and fix its
geometry; a LightningDiT also records its block switches (models/lightningdit.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from torch import nn

from models.conditioning import Conditioned, GuidanceEmbedder, IntervalEmbedder, LatentCodeEmbedder
from models.projector import Aligned
from models.dit import DiT
from models.lightningdit import LightningDiT

# size -> (depth, hidden_size, num_heads)
DIT_SIZES = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "T": (6, 128, 4),
}
PATCH_SIZES = (2, 4, 8)
LIGHTNINGDIT_PATCH_SIZES = {"XL": (1, 2), "L": (1, 2), "B": (1, 2), "S": (1, 2), "T": (2, 4)}

MODELS: dict[str, Callable[..., DiT]] = {
    f"DiT-{size}/{patch}": partial(DiT, depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in DIT_SIZES.items()
    for patch in PATCH_SIZES
}
LIGHTNINGDIT_MODELS: dict[str, Callable[..., LightningDiT]] = {
    f"LightningDiT-{size}/{patch}": partial(LightningDiT, depth=depth, hidden_size=hidden, num_heads=heads,
                                            patch_size=patch)
    for size, (depth, hidden, heads) in DIT_SIZES.items()
    for patch in LIGHTNINGDIT_PATCH_SIZES[size]
}
SWITCHES = ("rmsnorm", "swiglu", "rope", "qk_norm", "adaln_shift")
DIT_BLOCK = {"rmsnorm": False, "swiglu": False, "rope": False, "qk_norm": False, "adaln_shift": True}


@dataclass(frozen=True)
class Family:
    """A backbone family: its models, and the block switches a model of it may set (with their defaults)."""

    name: str
    models: dict
    switch_defaults: dict
    switchable: bool

    def switches(self, model_args: dict) -> dict:
        """The block switches of a model (a DiT's are fixed; absent from a LightningDiT's args: the defaults)."""
        return {k: bool(model_args.get(k, v)) if self.switchable else v for k, v in self.switch_defaults.items()}


FAMILIES = (Family("DiT", MODELS, DIT_BLOCK, switchable=False),
            Family("LightningDiT", LIGHTNINGDIT_MODELS, LightningDiT.DEFAULTS, switchable=True))


def family_of(name: str) -> Family:
    for family in FAMILIES:
        if name in family.models:
            return family
    names = [n for family in FAMILIES for n in family.models]
    raise ValueError(f"unknown model.name {name!r}; valid names: {', '.join(names)}")


def architecture(name: str) -> tuple[int, int, int, int]:
    """(depth, width, heads, patch) of a registered model."""
    keywords = family_of(name).models[name].keywords
    return keywords["depth"], keywords["hidden_size"], keywords["num_heads"], keywords["patch_size"]


def resolve_switches(name: str, **given) -> dict:
    """The block switches to store for `name` ({} for a DiT): None takes the family's default; a DiT accepts only
    its own fixed values (the switches are LightningDiT's)."""
    family = family_of(name)
    if not family.switchable:
        wrong = [f"model.{k}={v}" for k, v in given.items() if v is not None and bool(v) != DIT_BLOCK[k]]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: {name} is the reference DiT block; the switches rmsnorm, swiglu, "
                             "rope, qk_norm and adaln_shift are LightningDiT's (model.name=LightningDiT-...)")
        return {}
    return {k: bool(family.switch_defaults[k] if given.get(k) is None else given[k]) for k in SWITCHES}


def create_model(
    name: str,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
    grad_checkpointing: bool = False,
    guidance_embedding: bool = False,
    interval_embedding: bool = False,
    z_dim: int = 0,
    extra_in_channels: int = 0,
    alignment: dict | None = None,
    **switches,
) -> nn.Module:
    """Build the registered model `name` for latents of shape [in_channels, input_size, input_size], wrapped
    with a guidance-scale embedding (distilled students), an interval embedding (MeanFlow) or a latent-code
    embedding (DDGAN) when asked, and
    with REPA's projector when `alignment` ({depth, projector_dim, feature_dim}) is given."""
    family = family_of(name)
    patch_size = family.models[name].keywords["patch_size"]
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
    unknown = [k for k in switches if k not in SWITCHES]
    if unknown:
        raise ValueError(f"{name}: unknown model arguments {unknown}")
    backbone = family.models[name](
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
        grad_checkpointing=grad_checkpointing,
        extra_in_channels=extra_in_channels,
        **resolve_switches(name, **switches),
    )
    embedders = {}
    if guidance_embedding:  # after the backbone's initialisation: the same seed draws the same backbone
        embedders["s"] = GuidanceEmbedder(backbone.hidden_size)
    if interval_embedding:
        embedders["h"] = IntervalEmbedder(backbone.hidden_size)
    if z_dim > 0:
        embedders["z"] = LatentCodeEmbedder(z_dim, backbone.hidden_size)
    model = Conditioned(backbone, **embedders) if embedders else backbone
    return Aligned(model, **alignment) if alignment else model

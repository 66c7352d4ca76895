"""The training methods' extra network inputs, as wrappers around any backbone (DiT, LightningDiT).

A wrapper embeds its inputs into the backbone's width and adds them to the adaLN conditioning vector
(the backbone's `cond`), like the timestep: a distilled student's guidance scale `s` (GuidanceEmbedder),
a DDGAN generator's latent code `z` (LatentCodeEmbedder), a MeanFlow network's interval `h` (IntervalEmbedder). The wrapper's state dict is the backbone's,
with the reference key names unchanged, plus the embedders' keys (`guidance_embedder.*`, `z_embedder.*`,
`interval_embedder.*`),
so checkpoints look exactly as when these were part of DiT; attributes it does not have (learn_sigma,
blocks, y_embedder, ...) are the backbone's.
"""
from __future__ import annotations

import torch
from torch import nn

from models.dit import TimestepEmbedder

BACKBONE = "backbone."


class GuidanceEmbedder(TimestepEmbedder):
    """Guidance scale s -> vector added to the conditioning: a student that samples at any scale.

    Guided distillation (Meng et al., CVPR 2023) feeds the guidance weight to the student through
    an embedding. The timestep embedder's sinusoid + SiLU MLP applied to 100 (s - 1) (scales 1..11
    cover the range DiT's timesteps use), with the last layer starting at zero, so a freshly added
    embedder changes nothing: a copy of the teacher with it gives the teacher's outputs.
    """

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size)
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        return super().forward(100.0 * (scale.float() - 1.0))


class IntervalEmbedder(TimestepEmbedder):
    """The interval h = t - r of a MeanFlow network u(z_t, r, t) -> vector added to the conditioning.

    MeanFlow (Geng et al. 2025) conditions the network on two times, each through its own sinusoidal
    embedding, summed: t through the backbone's timestep embedder, h here (the same sinusoid and MLP). The
    last layer starts at zero, so a flow or DiT model copied into one is unchanged at first: at h = 0 the
    average velocity is the instantaneous one the flow model learned.
    """

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size)
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)


class LatentCodeEmbedder(nn.Module):
    """A GAN generator's latent code z -> vector added to the conditioning (DDGAN's G(x_t, z, t)).

    DDGAN feeds z through a mapping MLP into the generator's adaptive normalisation; adding its
    embedding to the adaLN conditioning vector is the same idea. z is normalised to unit RMS
    first (StyleGAN's pixel norm, also in DDGAN's mapping network), so its scale never matters.
    """

    def __init__(self, z_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(z_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        return self.mlp(z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8))


# forward keyword -> (the wrapper's attribute, what it is for the error messages)
INPUTS = {"s": ("guidance_embedder", "the guidance scale s"), "z": ("z_embedder", "the latent code z"),
          "h": ("interval_embedder", "the interval h = t - r")}


def _flat_state_dict(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: the backbone's keys without the wrapper's "backbone." level."""
    inner = prefix + BACKBONE
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _nest_state_dict(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """load_state_dict pre-hook: keys that are not the wrapper's own modules' go to the backbone."""
    own = tuple(prefix + name + "." for name in module.own_names)
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(own)]:
        state_dict[prefix + BACKBONE + key[len(prefix):]] = state_dict.pop(key)


class FlatWrapper(nn.Module):
    """A backbone with modules of its own beside it (`own_names`), whose state dict is the backbone's keys as they
    are plus its own; attributes it does not have are the backbone's."""

    own_names: tuple = ()

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.register_state_dict_post_hook(_flat_state_dict)
        self.register_load_state_dict_pre_hook(_nest_state_dict)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("backbone"), name)


class Conditioned(FlatWrapper):
    """backbone(x, t, y, cond = sum of the embedded extra inputs); forward(x, t, y, s=..., z=...)."""

    def __init__(self, backbone: nn.Module, **embedders: nn.Module):
        super().__init__(backbone)
        unknown = [name for name in embedders if name not in INPUTS]
        if unknown:
            raise ValueError(f"unknown conditioning inputs {unknown}; known: {', '.join(INPUTS)}")
        self.inputs = tuple(embedders)
        self.own_names = tuple(INPUTS[name][0] for name in embedders)
        for name, embedder in embedders.items():
            setattr(self, INPUTS[name][0], embedder)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, feature_depths: tuple = (), **extra):
        given = {name for name, value in extra.items() if value is not None}
        for name in set(INPUTS) | given:
            if (name in given) != (name in self.inputs):
                what = INPUTS[name][1] if name in INPUTS else name
                raise ValueError(f"{what} must be given exactly when the model has it "
                                 f"(this model takes: {', '.join(self.inputs) or 'none'})")
        cond = sum(getattr(self, INPUTS[name][0])(extra[name]) for name in self.inputs)
        return self.backbone(x, t, y, cond=cond, feature_depths=feature_depths)

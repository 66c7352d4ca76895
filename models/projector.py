"""REPA's projector beside any backbone: the hidden tokens after block `depth` -> the encoder's feature width.

Per token an MLP Linear(D, P) -> SiLU -> Linear(P, P) -> SiLU -> Linear(P, D_e) (REPA's `build_mlp`, P =
repa.projector_dim 2048), under the keys `projectors.0.{0,2,4}` of REPA's checkpoints, so theirs continue
training here and ours load in REPA's code. It trains with the model and is EMA-averaged with it; sampling
builds the backbone alone (the projector is not needed to generate).
"""
from __future__ import annotations

import torch
from torch import nn

from models.conditioning import FlatWrapper


def projector_mlp(width: int, projector_dim: int, feature_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, feature_dim))


class Aligned(FlatWrapper):
    """forward(x, t, y, project=False, **inputs): the backbone's output, and with `project` also the projected
    tokens [B, N, D_e] of block `depth` (1-based) from the same pass."""

    own_names = ("projectors",)

    def __init__(self, backbone: nn.Module, depth: int, projector_dim: int, feature_dim: int):
        super().__init__(backbone)
        blocks = len(backbone.blocks)
        if not 1 <= depth <= blocks:
            raise ValueError(f"repa.depth={depth} must be in 1..{blocks} (the blocks of the model)")
        self.depth = depth
        self.projectors = nn.ModuleList([projector_mlp(backbone.hidden_size, projector_dim, feature_dim)])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, project: bool = False, **inputs):
        if not project:
            return self.backbone(x, t, y, **inputs)
        out, (hidden,) = self.backbone(x, t, y, feature_depths=(self.depth,), **inputs)
        return out, self.projectors[0](hidden)

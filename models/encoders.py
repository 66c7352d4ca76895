"""Frozen visual encoders for representation alignment (REPA): a timm ViT by name, weights from a local file.

REPA (Yu et al. 2025) aligns the diffusion transformer's hidden tokens with the patch features of a frozen
self-supervised encoder of the clean image: DINOv2-B/14 (`vit_base_patch14_dinov2`) in the paper's best
setting. The image goes in as REPA's `preprocess_raw_image` prepares it for DINOv2: uint8 -> [0, 1] -> the
encoder's mean/std (ImageNet's for DINOv2) -> bicubic resize to `resolution` x (image size / 256) (224 for
256 px) -> the encoder, its position table resampled to that input (timm does it when the weights load) ->
the final-norm patch tokens (the prefix tokens dropped), resampled to the model's token grid when it differs.
Nothing is downloaded: timm builds the architecture and reads the weights from `weights` (timm's or the
original release's layout; timm's checkpoint filter converts and resamples).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_ENCODER = "vit_base_patch14_dinov2"


class FrozenEncoder(nn.Module):
    """encoder(images uint8 [B, 3, H, W]) -> patch tokens [B, grid^2, D] on the model's token grid (float32)."""

    def __init__(self, vit: nn.Module, resolution: int, grid: int):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        config = getattr(vit, "pretrained_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(config.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(config.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), False)
        self.resolution = resolution
        self.grid = grid
        self.dim = int(vit.embed_dim)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        return super().train(False)  # always in eval mode

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return encoder_input(images, self.mean, self.std, input_size(self.resolution, images.shape[-1]))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(self.preprocess(images))[:, self.vit.num_prefix_tokens:]
        return resample_tokens(tokens.float(), self.grid)


def encoder_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 [B, 1 or 3, H, W] -> the encoder's input: RGB, [0, 1], its mean/std, bicubic to side x side."""
    if images.shape[1] == 1:  # greyscale crops (the digits demo) as RGB
        images = images.expand(-1, 3, -1, -1)
    x = (images.float() / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False) if side != x.shape[-1] else x


def input_size(resolution: int, image_size: int) -> int:
    """REPA's encoder input side: resolution x image_size / 256 (224 for 256 px images with DINOv2)."""
    return max(1, round(resolution * image_size / 256))


def resample_tokens(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Square token grids [B, g^2, D] -> [B, grid^2, D] (bilinear when the grids differ)."""
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"the encoder's {tokens.shape[1]} patch tokens are not a square grid")
    if side == grid:
        return tokens
    image = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    image = F.interpolate(image, size=(grid, grid), mode="bilinear", align_corners=False)
    return image.flatten(2).transpose(1, 2)


def encoder_weights(vit: nn.Module, path: str) -> dict:
    """The file's state dict in timm's layout for `vit`: timm's own filter converts an original release (DINOv2's
    `dinov2_vitb14_pretrain.pth`) and resamples the position table to the input size; the classifier is dropped."""
    import sys

    from timm.models import load_state_dict

    state = load_state_dict(str(path), use_ema=True)
    convert = getattr(sys.modules[type(vit).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        state = convert(state, vit)
    return {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or k in vit.state_dict()}


def build_encoder(name: str, weights: str | None, resolution: int, image_size: int, grid: int,
                  kwargs: dict | None = None) -> FrozenEncoder:
    """The frozen encoder `name` (timm) with its weights from the local file `weights`, checked by a forward pass
    on the run's image size (the token grid must resample to `grid`)."""
    import timm

    if not weights:
        raise FileNotFoundError(f"repa.encoder_weights is not set: give a local file of {name}'s weights (timm's or "
                                "the original release's layout; nothing is downloaded)")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"repa.encoder_weights={weights}: no such file")
    side = input_size(resolution, image_size)
    try:
        vit = timm.create_model(name, pretrained=False, img_size=side, num_classes=0, **(kwargs or {}))
    except RuntimeError as err:
        if "unknown model" in str(err).lower():
            raise ValueError(f"repa.encoder={name!r} is not a timm model name") from None
        raise
    try:
        vit.load_state_dict(encoder_weights(vit, weights), strict=True)
    except RuntimeError as err:  # the file is another architecture
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ValueError(f"repa.encoder_weights={weights} does not fit {name} ({'; '.join(lines[1:3])[:300]}); check "
                         "repa.encoder and repa.encoder_kwargs") from None
    encoder = FrozenEncoder(vit, resolution, grid)
    with torch.no_grad():
        out = encoder(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8))
    if out.shape[1] != grid * grid:
        raise ValueError(f"{name}'s tokens do not resample to the model's {grid} x {grid} grid")
    return encoder

"""The time-conditional discriminator of a denoising diffusion GAN: D(x_{t-1}, x_t, t, y) -> logit.

DDGAN's discriminator sees a pair of consecutive diffusion states and the step, and tells a real
pair (both from the forward process) from a generated one (x_{t-1} drawn from the posterior around
the generator's x_0). Ours is a DiT-style encoder so that it works on any latent size the
generator does: the pair concatenated channel-wise, patchified, transformer blocks modulated by
the (t, y) conditioning (adaLN-Zero, as the generator), mean-pooled, and a linear head plus a
projection term <embed(y), h> (Miyato & Koyama 2018) for the class.

Registered as `D-{size}/{patch}` with the DiT sizes of models/__init__.py (D-S/2, D-T/4, ...).
`Conv-{width}` is the convolutional alternative, closer to the release's discriminator: residual
down-sampling blocks (LeakyReLU 0.2, the time/class embedding added as a per-channel bias) from
the input size down to 4x4, then a summed head. On small inputs it gives the generator spatially
smooth gradients where a patch embedding gives patch-periodic ones (our digits demo uses it).
"""
from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import PatchEmbed
from torch import nn

from models import DIT_SIZES, PATCH_SIZES
from models.dit import DiTBlock, TimestepEmbedder, sincos_2d_position_embedding

DISCRIMINATORS = {
    f"D-{size}/{patch}": (depth, hidden, heads, patch)
    for size, (depth, hidden, heads) in DIT_SIZES.items()
    for patch in PATCH_SIZES
}
CONV_WIDTHS = (32, 64, 128, 256)


class PairDiscriminator(nn.Module):
    """forward(x_prev [B, C, H, W], x_t [B, C, H, W], t [B], y [B]) -> logits [B] (real > 0)."""

    def __init__(self, input_size: int, in_channels: int, num_classes: int, depth: int, hidden_size: int,
                 num_heads: int, patch_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"discriminator: input_size {input_size} is not divisible by patch_size {patch_size}")
        self.in_channels = in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, 2 * in_channels, hidden_size, bias=True)
        grid = self.x_embedder.grid_size[0]
        self.register_buffer("pos_embed", torch.from_numpy(sincos_2d_position_embedding(hidden_size, grid)).float()[None],
                             persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes, hidden_size)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads) for _ in range(depth)])
        for block in self.blocks:  # R1 differentiates D twice: fused attention kernels have no double backward
            block.attn.fused_attn = False
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.head = nn.Linear(hidden_size, 1)
        self.projection = nn.Embedding(num_classes, hidden_size)
        self._initialize()

    def _initialize(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.projection.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(torch.cat([x_prev, x_t], dim=1)) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        h = self.norm(h.mean(dim=1))
        return self.head(h).squeeze(1) + (self.projection(y) * h).sum(dim=1)


class _DownBlock(nn.Module):
    """conv -> + embedding bias -> LeakyReLU -> conv -> LeakyReLU -> 2x average pool, with a pooled 1x1 skip."""

    def __init__(self, channels_in: int, channels_out: int, embed_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.embed = nn.Linear(embed_dim, channels_out)
        self.skip = nn.Conv2d(channels_in, channels_out, 1, bias=False)
        self.act = nn.LeakyReLU(0.2)
        self.pool = nn.AvgPool2d(2)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = self.act(self.conv1(h) + self.embed(c)[:, :, None, None])
        out = self.pool(self.act(self.conv2(out)))
        return (out + self.skip(self.pool(h))) / math.sqrt(2.0)


class ConvPairDiscriminator(nn.Module):
    """forward(x_prev, x_t, t, y) -> logits [B], as PairDiscriminator, with convolutions."""

    def __init__(self, input_size: int, in_channels: int, num_classes: int, width: int):
        super().__init__()
        levels = max(1, int(math.log2(max(input_size // 4, 1))))  # down to 4x4 (one level at least)
        channels = [min(width * 2**i, 4 * width) for i in range(levels + 1)]
        embed_dim = 4 * width
        self.stem = nn.Conv2d(2 * in_channels, channels[0], 3, padding=1)
        self.t_embedder = TimestepEmbedder(embed_dim)
        self.y_embedder = nn.Embedding(num_classes, embed_dim)
        self.blocks = nn.ModuleList([_DownBlock(channels[i], channels[i + 1], embed_dim) for i in range(levels)])
        self.act = nn.LeakyReLU(0.2)
        self.head = nn.Linear(channels[-1], 1)
        self.projection = nn.Embedding(num_classes, channels[-1])
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.projection.weight, std=0.02)

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(t) + self.y_embedder(y)
        h = self.stem(torch.cat([x_prev, x_t], dim=1))
        for block in self.blocks:
            h = block(h, c)
        h = self.act(h).sum(dim=(2, 3))
        return self.head(h).squeeze(1) + (self.projection(y) * h).sum(dim=1)


def discriminator_names() -> list[str]:
    return [*DISCRIMINATORS, *(f"Conv-{w}" for w in CONV_WIDTHS)]


def create_discriminator(name: str, input_size: int, in_channels: int, num_classes: int) -> nn.Module:
    """The registered discriminator `name` (D-{size}/{patch} or Conv-{width}) for latents
    [in_channels, input_size, input_size]."""
    if name in DISCRIMINATORS:
        depth, hidden, heads, patch = DISCRIMINATORS[name]
        return PairDiscriminator(input_size, in_channels, num_classes, depth, hidden, heads, patch)
    if name in [f"Conv-{w}" for w in CONV_WIDTHS]:
        return ConvPairDiscriminator(input_size, in_channels, num_classes, int(name.split("-")[1]))
    raise ValueError(f"unknown discriminator {name!r}; valid names: {', '.join(discriminator_names())}")

"""DiT: a class-conditional diffusion transformer with adaLN-Zero blocks (Peebles & Xie, 2023).

Parameter names and shapes follow the paper's reference implementation
(facebookresearch/DiT, models.py) so that published checkpoints such as
DiT-XL-2-256x256.pt load with `strict=True`. Layers come from timm: PatchEmbed, the ViT
Attention (fused scaled-dot-product attention) and Mlp. Modules are created and initialised
in the reference order, so the same seed gives the same initial weights.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention

FREQUENCY_EMBEDDING_SIZE = 256  # width of the sinusoidal timestep features fed to the timestep MLP


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: [cos(t*f_i), sin(t*f_i)], f_i = max_period^(-i/half).

    Transformer position encoding applied to t (DDPM / DiT convention, cos half first).
    t: [B] long or float; returns float32 [B, dim] (a zero column is appended when dim is odd).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def sincos_1d_position_embedding(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """[sin(p*w_i), cos(p*w_i)] with w_i = 10000^(-i/(embed_dim/2)) (MAE convention, sin half first)."""
    if embed_dim % 2:
        raise ValueError(f"1D sin-cos embedding needs an even width, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_position_embedding(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2D sin-cos embedding [grid_size**2, embed_dim] in float64, tokens in row-major (h, w) order.

    MAE / DiT convention: for the token in row i, column j, the first half of the width
    encodes the column index j and the second half the row index i (the reference builds
    the grid with np.meshgrid(w, h)).
    """
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    col_embedding = sincos_1d_position_embedding(embed_dim // 2, cols)
    row_embedding = sincos_1d_position_embedding(embed_dim // 2, rows)
    return np.concatenate([col_embedding, row_embedding], axis=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: scale and shift every token of x [B, N, D] by per-sample [B, D] vectors (paper Sec. 3.2)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _tanh_gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


class TimestepEmbedder(nn.Module):
    """Timestep -> vector: sinusoidal features followed by a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector, with label dropout to a null class for classifier-free guidance.

    When dropout_prob > 0 the table has num_classes + 1 rows; row num_classes is the
    "no label" embedding used for the unconditional half of CFG sampling.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null index num_classes: at random, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """Transformer block with LayerNorms modulated by the conditioning c and zero-initialised gates (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.attn.fused_attn = True  # always torch's scaled_dot_product_attention, whatever TIMM_FUSED_ATTN says
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=mlp_hidden, act_layer=_tanh_gelu, drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map from each token to its patch of output pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer: patchify -> N adaLN-Zero blocks conditioned on (t, y) -> unpatchify.

    forward(x [B, C, H, W], t [B] long or float, y [B] long) -> [B, out_channels, H, W], where
    out_channels = 2C (epsilon and the variance interpolation v) if learn_sigma else C.
    `extra_in_channels` > 0 widens the input to C + extra channels while the output stays C-based
    (CLD: position and velocity in, the velocity score out). forward's `cond` [B, hidden] is added to
    the adaLN conditioning vector: the methods' extra inputs (a distilled student's guidance scale,
    DDGAN's latent code) come in through it, embedded by wrappers (models/conditioning.py).
    `feature_depths` (1-based block indices) also returns the hidden tokens [B, N, hidden] after
    those blocks, for feature losses (representation alignment).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        grad_checkpointing: bool = False,
        extra_in_channels: int = 0,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.grad_checkpointing = grad_checkpointing
        self.extra_in_channels = extra_in_channels

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels + extra_in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed (not trained) but a Parameter, as in the reference, so it is part of the state dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = self.make_blocks(hidden_size, num_heads, mlp_ratio, depth)
        self.final_layer = self.make_final_layer(hidden_size, patch_size, self.out_channels)
        self.hidden_size = hidden_size
        self.initialize_weights()

    def make_blocks(self, width: int, num_heads: int, mlp_ratio: float, depth: int) -> nn.ModuleList:
        """The transformer blocks (a subclass with other blocks overrides this and the two below)."""
        return nn.ModuleList([DiTBlock(width, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])

    def make_final_layer(self, width: int, patch_size: int, out_channels: int) -> nn.Module:
        return FinalLayer(width, patch_size, out_channels)

    def block_inputs(self) -> dict:
        """Extra keyword inputs of every block (LightningDiT: the rotary embedding)."""
        return {}

    def initialize_weights(self) -> None:
        """adaLN-Zero initialisation (paper Sec. 3.2): every block starts as the identity, the output as zero."""

        def xavier_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(xavier_linear)
        grid_size = self.input_size // self.patch_size
        pos_embed = sincos_2d_position_embedding(self.pos_embed.shape[-1], grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Patch embedding: initialise like a linear layer over the flattened patch (ViT / MAE).
        proj_weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(proj_weight.view([proj_weight.shape[0], -1]))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, about 1/3 more compute)."""
        self.grad_checkpointing = enable

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, p*p*C] (row-major patches) -> images [B, C, H, W]."""
        c = self.out_channels
        p = self.patch_size
        h, w = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cond: torch.Tensor | None = None,
                feature_depths: tuple = ()):
        expected = (self.in_channels + self.extra_in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"DiT expects x of shape [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        if cond is not None:
            c = c + cond
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        inputs = self.block_inputs()
        features = []
        for depth, block in enumerate(self.blocks, 1):
            if use_checkpoint:
                x = checkpoint(block, x, c, use_reentrant=False, **inputs)
            else:
                x = block(x, c, **inputs)
            if depth in feature_depths:
                features.append(x)
        out = self.unpatchify(self.final_layer(x, c))
        return (out, features) if feature_depths else out

"""LightningDiT (Yao et al. 2025, arXiv 2501.01423): DiT's skeleton with modernised blocks.

The patch embedding, timestep and label embedders, the fixed sin-cos table, adaLN-Zero and the final
layer are DiT's (models/dit.py). Each block can switch on, as the release does (its config):
  rmsnorm     RMSNorm with a learned scale instead of DiT's affine-free LayerNorm (blocks and final layer)
  swiglu      SwiGLU feed-forward, hidden int(2/3 * 4 D), out = w3(silu(x1) * x2) with w12 -> (x1, x2)
  rope        2-D axial rotary embedding on q and k (EVA's layout: half the head width rotates with the
              row, half with the column, frequencies theta^(-2i/d) for theta 10000), beside the sin-cos table
  qk_norm     RMSNorm (LayerNorm without rmsnorm) of q and k per head, against loss spikes (off as released)
  adaln_shift the adaLN shift terms (off: "wo_shift", 4 modulation vectors per block instead of 6)
qkv projections have biases. Parameter and buffer names follow the release (models/lightningdit.py,
models/swiglu_ffn.py, models/pos_embed.py of hustvl/LightningDiT), so its checkpoints load with strict=True.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp, RmsNorm
from torch import nn

from models.dit import DiT, _tanh_gelu

ROPE_THETA = 10000.0
RMS_EPS = 1e-6


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Each pair (x_2i, x_2i+1) of the last axis -> (-x_2i+1, x_2i): a quarter turn in every plane."""
    pairs = x.unflatten(-1, (-1, 2))
    first, second = pairs.unbind(-1)
    return torch.stack((-second, first), dim=-1).flatten(-2)


def axial_rope_tables(head_dim: int, grid: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [grid^2, head_dim] for tokens in row-major order: the first half of a head's width turns with
    the token's row, the second half with its column, each by pos * theta^(-2i / (head_dim / 2)) per pair."""
    axis = head_dim // 2
    if axis % 2:
        raise ValueError(f"2-D rotary embedding needs a head width divisible by 4, got {head_dim}")
    freqs = 1.0 / theta ** (torch.arange(0, axis, 2)[: axis // 2].float() / axis)
    positions = torch.arange(grid) / grid * grid  # EVA's positions (pt_seq_len = ft_seq_len)
    angles = torch.outer(positions, freqs).repeat_interleave(2, dim=-1)  # [grid, axis]: f0 f0 f1 f1 ...
    rows = angles[:, None, :].expand(grid, grid, axis)
    cols = angles[None, :, :].expand(grid, grid, axis)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, 2 * axis)
    return table.cos(), table.sin()


class AxialRotaryEmbedding(nn.Module):
    """Rotates q or k [B, heads, N, head_dim] by the token's 2-D position (the tables are buffers, as released)."""

    def __init__(self, head_dim: int, grid: int):
        super().__init__()
        cos, sin = axial_rope_tables(head_dim, grid)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return (t * self.freqs_cos + rotate_half(t) * self.freqs_sin).to(t.dtype)


def norm_layer(width: int, rmsnorm: bool, affine_layernorm: bool = False, eps: float = 1e-6) -> nn.Module:
    """RMSNorm with a learned scale, or LayerNorm (DiT's blocks: no affine; QK-norm: affine, eps 1e-5)."""
    if rmsnorm:
        return RmsNorm(width, eps=RMS_EPS)
    return nn.LayerNorm(width, elementwise_affine=affine_layernorm, eps=eps)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias, optional QK-norm and rotary q/k; fused SDPA unless disabled."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rmsnorm: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused_attn = True
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = norm_layer(self.head_dim, rmsnorm, affine_layernorm=True, eps=1e-5) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, rmsnorm, affine_layernorm=True, eps=1e-5) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:  # explicit matmuls (FLOP counting; forward-mode AD)
            x = (q * self.head_dim**-0.5 @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, width))


class SwiGLU(nn.Module):
    """out = w3(silu(x1) * x2), (x1, x2) = w12(x) (the release's SwiGLUFFN: biases on, w1 and w2 fused)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def swiglu_hidden(width: int, mlp_ratio: float = 4.0) -> int:
    return int(2 / 3 * int(width * mlp_ratio))


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN, with or without the shift term."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


class LightningDiTBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float, rmsnorm: bool, swiglu: bool, qk_norm: bool,
                 adaln_shift: bool):
        super().__init__()
        self.norm1 = norm_layer(width, rmsnorm)
        self.attn = Attention(width, num_heads, qk_norm, rmsnorm)
        self.norm2 = norm_layer(width, rmsnorm)
        if swiglu:
            self.mlp = SwiGLU(width, swiglu_hidden(width, mlp_ratio))
        else:
            self.mlp = Mlp(in_features=width, hidden_features=int(width * mlp_ratio), act_layer=_tanh_gelu, drop=0)
        self.adaln_shift = adaln_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, (6 if adaln_shift else 4) * width, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        if self.adaln_shift:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        else:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """DiT's final layer with the block's norm (RMSNorm with rmsnorm); the release keeps its shift."""

    def __init__(self, width: int, patch_size: int, out_channels: int, rmsnorm: bool):
        super().__init__()
        self.norm_final = norm_layer(width, rmsnorm)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LightningDiT(DiT):
    """DiT with LightningDiT's blocks; forward and everything around the blocks are DiT's."""

    DEFAULTS = {"rmsnorm": True, "swiglu": True, "rope": True, "qk_norm": False, "adaln_shift": True}  # as released

    def __init__(self, *args, rmsnorm: bool = True, swiglu: bool = True, rope: bool = True, qk_norm: bool = False,
                 adaln_shift: bool = True, **kwargs):
        self.switches = {"rmsnorm": rmsnorm, "swiglu": swiglu, "rope": rope, "qk_norm": qk_norm,
                         "adaln_shift": adaln_shift}
        super().__init__(*args, **kwargs)

    def make_blocks(self, width: int, num_heads: int, mlp_ratio: float, depth: int) -> nn.ModuleList:
        s = self.switches
        self.feat_rope = AxialRotaryEmbedding(width // num_heads, self.x_embedder.grid_size[0]) if s["rope"] else None
        return nn.ModuleList([LightningDiTBlock(width, num_heads, mlp_ratio, s["rmsnorm"], s["swiglu"], s["qk_norm"],
                                                s["adaln_shift"]) for _ in range(depth)])

    def make_final_layer(self, width: int, patch_size: int, out_channels: int) -> nn.Module:
        return FinalLayer(width, patch_size, out_channels, self.switches["rmsnorm"])

    def block_inputs(self) -> dict:
        return {"rope": self.feat_rope}

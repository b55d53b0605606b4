"""The plain ViT transformer block (timm's `vision_transformer.Block` layout), bidirectional attention.

Pre-norm: x + proj(attention(LayerNorm(x))), then x + fc2(GELU(fc1(LayerNorm(x)))). No layer scale,
no drop-path, no q/k norm, so the state-dict keys are exactly `norm1`, `attn.qkv`, `attn.proj`,
`norm2`, `mlp.fc1`, `mlp.fc2`, as in the released checkpoints built on timm (MAE, MAR).
"""
from __future__ import annotations

import torch
from torch import nn

from common.attention import bidirectional_attention, merge_heads
from common.errors import ConfigError


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; qkv rows are [q; k; v], heads contiguous."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"width {dim} must be a multiple of the number of heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C), or only the positions `keep` (B, Q) -> (B, Q, C). The attention itself still
        runs for every query: a fused kernel may round a handful of queries differently from a full set, and
        the kept outputs should be those of the full pass; the projection is what is saved."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, T, hd) each
        out = merge_heads(bidirectional_attention(q, k, v, self.attn_drop if self.training else 0.0))  # (B, T, C)
        if keep is not None:
            out = gather_positions(out, keep)  # (B, Q, C)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """fc1, exact (erf) GELU, dropout, fc2, dropout (the same rate twice)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LayerNorm ViT block. `proj_drop` follows the attention projection and both MLP layers."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-5, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with `keep` (B, Q) only those positions' outputs (B, Q, C): when a last block's
        output is read at a few positions, the projection and MLP of the others would be thrown away."""
        attended = self.attn(self.norm1(x), keep)
        x = (x if keep is None else gather_positions(x, keep)) + attended
        return x + self.mlp(self.norm2(x))


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) at positions (B, Q) -> (B, Q, C)."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))

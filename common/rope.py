"""2-D rotary position embeddings for a raster-ordered grid of tokens (LlamaGen's GPT).

Each head's channels are rotated in adjacent pairs (x[2m], x[2m+1]); the first half of the pairs
turns with the token's row, the second half with its column. Rows for leading condition tokens are
all zeros (cos = sin = 0): their queries and keys become zero, as in the official model.
"""
from __future__ import annotations

import torch


def rope_2d_table(grid: int, head_dim: int, base: float = 10000.0, num_prefix: int = 1) -> torch.Tensor:
    """(num_prefix + grid^2, head_dim / 2, 2) float32 table of (cos, sin) per position and channel pair."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    freqs = 1.0 / base ** (torch.arange(0, head_dim // 2, 2)[: head_dim // 4].float() / (head_dim // 2))
    coords = torch.arange(grid, dtype=torch.float32)
    rows = torch.outer(coords, freqs)  # (grid, head_dim / 4)
    angles = torch.cat([rows[:, None, :].expand(grid, grid, -1),  # row angles, then column angles
                        rows[None, :, :].expand(grid, grid, -1)], dim=-1).reshape(grid * grid, head_dim // 2)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return torch.cat([torch.zeros(num_prefix, head_dim // 2, 2), table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n_head, T, head_dim) by table rows (T, head_dim / 2, 2), in float32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[..., 0], table[..., 1]
    rotated = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                           pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1)
    return rotated.flatten(-2).type_as(x)

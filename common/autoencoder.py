"""The taming / LDM convolutional encoder and decoder, shared by the RQ-VAE and the KL-16 VAE of MAR.

Encoder: conv_in, one `Level` per entry of ch_mult (`down.i`: residual blocks, attention after
each block at the resolutions listed, a downsampling except at the last level), the `mid`
block, then norm_out / SiLU / conv_out. The decoder mirrors it with one more residual block
per level (`up.i`, run from the deepest level up). Module names are those of the official
state dicts, so released checkpoints of both methods load as they are.

Attention is placed by nominal resolution: level i works at `resolution / 2^i`, and has
attention when that number is in the module's `attn_resolutions`. The RQ-VAE gives encoder and
decoder the same list; the KL-16 VAE gives its decoder none (its mid block still attends).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.layers import AttnBlock, Level, Normalize, ResnetBlock


class MidBlock(nn.Module):
    """Residual block, attention, residual block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, checkpointing: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, checkpointing)
        self.attn_1 = AttnBlock(channels, checkpointing)
        self.block_2 = ResnetBlock(channels, channels, dropout, checkpointing)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images (B, in_channels, R, R) -> features (B, z_channels, R / 2^(L-1), R / 2^(L-1)), L = len(ch_mult).

    With `double_z` the output has 2 * z_channels: the mean and log-variance of a KL autoencoder.
    """

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 resolution: int, in_channels: int, z_channels: int, dropout: float = 0.0,
                 checkpointing: bool = False, double_z: bool = False):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        widths = [ch] + [ch * m for m in ch_mult]
        self.down = nn.ModuleList()
        for i in range(len(ch_mult)):
            res = resolution // 2 ** i
            last = i == len(ch_mult) - 1
            self.down.append(Level(widths[i], widths[i + 1], num_res_blocks, res in attn_resolutions, dropout,
                                   checkpointing, resample=None if last else "down"))
        self.mid = MidBlock(widths[-1], dropout, checkpointing)
        self.norm_out = Normalize(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, R, R)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, ch * ch_mult[-1], R / 2^(L-1), R / 2^(L-1))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features (B, z_channels, r, r) -> images (B, out_ch, r * 2^(L-1), r * 2^(L-1)), unbounded (no tanh).

    `up.{i}` is the level of resolution R / 2^i (run from i = L-1 down to 0) and has
    num_res_blocks + 1 residual blocks, one more than the encoder's levels.
    """

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 resolution: int, out_ch: int, z_channels: int, dropout: float = 0.0, checkpointing: bool = False):
        super().__init__()
        L = len(ch_mult)
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = MidBlock(widths[-1], dropout, checkpointing)
        levels = {}
        in_width = widths[-1]
        for i in reversed(range(L)):
            res = resolution // 2 ** i
            levels[i] = Level(in_width, widths[i], num_res_blocks + 1, res in attn_resolutions, dropout,
                              checkpointing, resample="up" if i > 0 else None)
            in_width = widths[i]
        self.up = nn.ModuleList(levels[i] for i in range(L))  # indexed by level, as the official state dict
        self.norm_out = Normalize(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], r, r)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, R, R)

"""Blocks of the MAGVIT-2 encoder and decoder that differ from the VQGAN ones in common/layers.py.

Bias-free residual convolutions, a symmetric stride-2 downsampling conv, a depth-to-space
upsampler (DCR channel order, not PixelShuffle's) and the decoder's adaptive GroupNorm whose
scale and shift are predicted from the quantized latent. Names follow the official state dict.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.layers import Normalize


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice, convs without bias, no dropout."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.norm2 = Normalize(out_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return h + shortcut


def depth_to_space(x: torch.Tensor, block: int = 2) -> torch.Tensor:
    """(B, block^2 * C, H, W) -> (B, C, block * H, block * W), DCR order.

    Input channel i * block * C + j * C + c lands at output pixel (block * y + i, block * x + j) of
    channel c: the sub-pixel offset is the OUTER index (PixelShuffle makes it the inner one).
    """
    B, C4, H, W = x.shape
    C = C4 // block ** 2
    x = x.view(B, block, block, C, H, W).permute(0, 3, 4, 1, 5, 2)  # (B, C, H, i, W, j)
    return x.reshape(B, C, H * block, W * block)


class Upsampler(nn.Module):
    """x2 upsampling: a 3x3 conv to 4x the channels, then depth-to-space."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4 * channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(self.conv1(x))  # (B, C, 2H, 2W)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine parameters, then a per-sample scale and shift predicted from the
    quantized latent: scale = gamma(std_hw(q)), shift = beta(mean_hw(q))."""

    def __init__(self, z_channels: int, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)

    def forward(self, x: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
        q = quant.flatten(2)  # (B, K, h*w)
        std = (q.var(dim=-1) + 1e-6).sqrt()  # unbiased variance (needs h*w >= 2), as the official code
        scale = self.gamma(std)[:, :, None, None]  # (B, C, 1, 1)
        shift = self.beta(q.mean(dim=-1))[:, :, None, None]
        return self.norm(x) * scale + shift

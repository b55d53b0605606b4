"""Reusable layers shared by the models of every method.

VQGAN-family convolutional blocks (taming-transformers layout, used by the RQ-VAE and the
LlamaGen VQ tokenizer): GroupNorm, residual blocks, single-head spatial attention, and
2x down/up-sampling; and the Llama-style transformer parts of LlamaGen's GPT: RMSNorm and the
SwiGLU feed-forward; and the Linear of the priors, faster in sampling on the CPU. Parameter names
follow the official state dicts.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, as in VQGAN (channels must be a multiple of 32)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class CheckpointedBlock(nn.Module):
    """A block whose activations can be recomputed in the backward pass instead of stored.

    Only in training with gradients on; the numbers are the same either way.
    """

    def __init__(self, checkpointing: bool = False):
        super().__init__()
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.block_forward, x, use_reentrant=False)
        return self.block_forward(x)

    def block_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ResnetBlock(CheckpointedBlock):
    """Pre-activation residual block: two (GroupNorm, SiLU, 3x3 conv) stages, 1x1 conv shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 checkpointing: bool = False):
        super().__init__(checkpointing)
        out_channels = out_channels or in_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def block_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(CheckpointedBlock):
    """Single-head self-attention over all H*W positions, 1x1 convs for q/k/v/out, residual."""

    def __init__(self, channels: int, checkpointing: bool = False):
        super().__init__(checkpointing)
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def block_forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (B, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v)  # one head: the scale is C^-1/2 over all channels
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve the resolution: zero-pad right and bottom by one pixel, then a 3x3 stride-2 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding: symmetric gives other numbers


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of a convolutional encoder or decoder: residual blocks, each followed by attention
    when `with_attn`, then an optional 2x `downsample` (resample "down") or `upsample` (resample "up").

    The VQGAN blocks by default; a family with its own residual block or resampling (MAGVIT-2) passes
    their factories. The residual blocks are registered as `blocks_key` (the RQ-VAE's and MAGVIT-2's
    state dicts say `block`, LlamaGen's `res`), so that official checkpoints load as they are.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool = False,
                 dropout: float = 0.0, checkpointing: bool = False, resample: str | None = None,
                 blocks_key: str = "block", block: Callable[[int, int], nn.Module] | None = None,
                 downsample: Callable[[int], nn.Module] = Downsample, upsample: Callable[[int], nn.Module] = Upsample):
        super().__init__()
        block = block or functools.partial(ResnetBlock, dropout=dropout, checkpointing=checkpointing)
        self.blocks_key = blocks_key
        self.add_module(blocks_key, nn.ModuleList(block(in_channels if j == 0 else out_channels, out_channels)
                                                  for j in range(num_blocks)))
        self.attn = nn.ModuleList(AttnBlock(out_channels, checkpointing) for _ in range(num_blocks if with_attn else 0))
        if resample == "down":
            self.downsample = downsample(out_channels)
        elif resample == "up":
            self.upsample = upsample(out_channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(getattr(self, self.blocks_key)):
            h = block(h)
            if self.attn:
                h = self.attn[j](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) computed in float32, cast back, times a learned per-channel weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLU(nn.Module):
    """Bias-free gated feed-forward: w2(silu(w1 x) * w3 x), then dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = SamplingLinear(dim, hidden, bias=False)
        self.w3 = SamplingLinear(dim, hidden, bias=False)
        self.w2 = SamplingLinear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


# In sampling on the CPU (fp32, no autograd) MKL's product of a few rows against a weight read from memory is
# far from the memory roof on the CPUs measured here (benchmarks/README.md). Two rearrangements of the same dot
# products are faster:
# - a weight of thousands of output features (a codebook head) in blocks of 512 features, 1.2-2.2x: each
#   output is the same dot product over the input features, so the values are bitwise equal;
# - 16 to 64 rows as weight @ x^T: MKL computes the same products with its operands swapped, and the whole
#   sampler is 1.05-1.2x faster (GPT-B at batch 16 with guidance, RQ-Transformer small at batch 32). That gives
#   the same bits on the CPUs measured, but nothing promises it, so a shape takes this path only after a probe
#   product of that shape (and thread count) came out bitwise equal.
OUTPUT_BLOCK = 512
BLOCKED_FROM = 4096  # fewer output features than this run as one product: blocks gain nothing there
TRANSPOSED_ROWS = (16, 64)  # fewer rows: not faster; from 100 rows on the RQ sampler was slower
_transposed_exact: dict[tuple[int, ...], bool] = {}


def transposed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) computed as (weight @ x^T)^T, contiguous."""
    rows = x.reshape(-1, x.shape[-1]).t()
    out = torch.mm(weight, rows) if bias is None else torch.addmm(bias[:, None], weight, rows)
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


def transposed_is_exact(out_features: int, in_features: int, rows: int, with_bias: bool) -> bool:
    """Whether `transposed_linear` gives F.linear's bits for this shape here: probed once on random operands."""
    key = (out_features, in_features, rows, with_bias, torch.get_num_threads())
    if key not in _transposed_exact:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(out_features, in_features, generator=generator)
        x = torch.randn(rows, in_features, generator=generator)
        bias = torch.randn(out_features, generator=generator) if with_bias else None
        _transposed_exact[key] = torch.equal(transposed_linear(x, weight, bias), F.linear(x, weight, bias))
    return _transposed_exact[key]


def sampling_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), computed in blocks of output features or as weight @ x^T where that is faster
    and bitwise the same: fp32 on the CPU, without autograd (whose gradient sums would round otherwise)."""
    fp32_on_cpu = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
    sampling = not (torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"))
    if not (fp32_on_cpu and sampling):
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    if out_features >= BLOCKED_FROM:
        weights = weight.split(OUTPUT_BLOCK)
        biases = bias.split(OUTPUT_BLOCK) if bias is not None else [None] * len(weights)
        return torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)
    rows = x.numel() // in_features
    if (TRANSPOSED_ROWS[0] <= rows <= TRANSPOSED_ROWS[1]
            and transposed_is_exact(out_features, in_features, rows, bias is not None)):
        return transposed_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class SamplingLinear(nn.Linear):
    """nn.Linear whose products in sampling on the CPU are computed faster, bitwise the same (`sampling_linear`);
    the priors' projections and codebook heads are these."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sampling_linear(x, self.weight, self.bias)

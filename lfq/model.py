"""The Open-MAGVIT2 tokenizer: MAGVIT-2 style encoder and decoder around a lookup-free quantizer.

Images (B, 3, H, W) in [-1, 1] -> encoder -> latent (B, K, H/f, W/f) -> sign bits -> codes
(B, H/f, W/f) in [0, 2^K) -> +-1 latent -> decoder (adaptive GroupNorms conditioned on that
latent) -> images. f = 2^(len(ch_mult) - 1); no attention anywhere, so any H, W divisible by f
work. Module names follow the official state dict (TencentARC/Open-MAGVIT2), so released
weights load as they are (see lfq/official.py).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.config import validate
from common.errors import ConfigError, DataError
from common.layers import Level, Normalize
from common.tokenizer import DiscreteTokenizer
from lfq.layers import AdaptiveGroupNorm, ResBlock, Upsampler
from lfq.quantizer import LFQLosses, LookupFreeQuantizer, codes_to_latent
from lfq.schema import LFQ_ARCH


def strided_conv(channels: int) -> nn.Conv2d:
    """The encoder's 2x downsampling: a 3x3 stride-2 conv with symmetric padding (no module around it)."""
    return nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)


def magvit2_level(in_channels: int, out_channels: int, num_blocks: int, resample: str | None = None) -> Level:
    """One MAGVIT-2 resolution: bias-free residual blocks (the first changes the width), then an optional
    stride-2 conv (encoder) or depth-to-space upsampler (decoder)."""
    return Level(in_channels, out_channels, num_blocks, resample=resample, block=ResBlock, downsample=strided_conv,
                 upsample=Upsampler)


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> latent (B, z_channels, H/f, W/f), f = 2^(len(ch_mult) - 1)."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, in_channels: int = 3):
        super().__init__()
        widths = [ch] + [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1, bias=False)
        self.down = nn.ModuleList(magvit2_level(widths[i], widths[i + 1], num_res_blocks,
                                                resample="down" if i < len(ch_mult) - 1 else None)
                                  for i in range(len(ch_mult)))
        self.mid_block = nn.ModuleList(ResBlock(widths[-1], widths[-1]) for _ in range(num_res_blocks))
        self.norm_out = Normalize(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
        for block in self.mid_block:
            h = block(h)  # (B, ch * ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, K, H/f, W/f)


class Decoder(nn.Module):
    """Quantized latent (B, z_channels, h, w) -> images (B, out_ch, f*h, f*w), unbounded (no tanh).

    Level i (run from the last to 0) starts with `adaptive.{i}`, a GroupNorm whose scale and
    shift come from the decoder INPUT latent (the same for every level).
    """

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, out_ch: int = 3):
        super().__init__()
        L = len(ch_mult)
        widths = [ch * m for m in ch_mult]
        entering = [widths[min(i + 1, L - 1)] for i in range(L)]  # width entering level i
        self.conv_in = nn.Conv2d(z_channels, widths[-1], kernel_size=3, padding=1)
        self.mid_block = nn.ModuleList(ResBlock(widths[-1], widths[-1]) for _ in range(num_res_blocks))
        self.up = nn.ModuleList(magvit2_level(entering[i], widths[i], num_res_blocks, resample="up" if i > 0 else None)
                                for i in range(L))  # indexed by level, as the official state dict
        self.adaptive = nn.ModuleList(AdaptiveGroupNorm(z_channels, entering[i]) for i in range(L))
        self.norm_out = Normalize(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_ch, kernel_size=3, padding=1)

    def forward(self, quant: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(quant)  # (B, ch * ch_mult[-1], h, w)
        for block in self.mid_block:
            h = block(h)
        for i in reversed(range(len(self.up))):
            h = self.up[i](self.adaptive[i](h, quant))  # x2 resolution for every level but 0
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, f*h, f*w)


class LFQTokenizer(DiscreteTokenizer):
    """Images <-> codes (B, h, w) in [0, 2^K) (the interface of common/tokenizer.py)."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, num_bits: int, image_size: int,
                 in_channels: int = 3, out_ch: int = 3, sample_minimization_weight: float = 1.0,
                 batch_maximization_weight: float = 1.0, entropy_mode: str = "factorized"):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, num_bits, in_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, num_bits, out_ch)
        self.quantize = LookupFreeQuantizer(num_bits, sample_minimization_weight, batch_maximization_weight,
                                            entropy_mode)
        self.num_bits = num_bits
        self.in_channels = in_channels
        self.resolution = image_size
        self.downsample_factor = 2 ** (len(ch_mult) - 1)

    @classmethod
    def from_config(cls, arch: Mapping[str, Any], source: str = "config") -> "LFQTokenizer":
        """Build from the `arch` section of a stage-1 config (see lfq/schema.py)."""
        arch = validate(arch, LFQ_ARCH, source, prefix="arch.")
        dd = arch["ddconfig"]
        check_arch(arch, source)
        return cls(dd["ch"], dd["ch_mult"], dd["num_res_blocks"], arch["embed_dim"], arch["image_size"],
                   dd["in_channels"], dd["out_ch"], arch["sample_minimization_weight"],
                   arch["batch_maximization_weight"], arch["entropy_mode"])

    @property
    def vocab_size(self) -> int:
        return 2 ** self.num_bits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, LFQLosses, torch.Tensor]:
        """Images -> (reconstruction (B, 3, H, W) unclamped, LFQLosses, codes (B, h, w) int64).

        LFQLosses holds (entropy_aux, per_sample_entropy, codebook_entropy, commitment), scalars;
        all four are zero in eval mode. The Open-MAGVIT2 generator loss adds
        codebook_weight * entropy_aux + commit_weight * commitment.
        """
        quant, losses, codes = self.quantize(self.encode(x))
        return self.decode(quant), losses, codes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> continuous latent (B, K, H/f, W/f), before quantization."""
        self.check_images(x)
        return self.encoder(x)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantized latent (B, K, h, w) -> images (B, 3, f*h, f*w), unclamped."""
        return self.decoder(quant)

    @torch.no_grad()
    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> codes (B, h, w), int64; bit d of a code is the sign of latent channel d."""
        return self.quantize(self.encode(x))[2]

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> the +-1 latent (B, K, h, w) the decoder reads."""
        return codes_to_latent(codes, self.num_bits).to(self.decoder.conv_in.weight.dtype)

    def check_images(self, x: torch.Tensor) -> None:
        """Refuse input that is not a float batch (B, in_channels, H, W) with H, W multiples of f
        and at least two latent positions (the adaptive GroupNorm needs a variance)."""
        f = self.downsample_factor
        if (x.ndim != 4 or x.shape[1] != self.in_channels or not x.is_floating_point()
                or x.shape[2] % f or x.shape[3] % f or x.shape[2] * x.shape[3] < 2 * f * f):
            raise DataError(f"images must be a float tensor (B, {self.in_channels}, H, W) in [-1, 1] with H and W "
                            f"multiples of {f} and H*W >= {2 * f * f} (e.g. {self.resolution}x{self.resolution}), "
                            f"got {x.dtype} {tuple(x.shape)}")


def check_arch(arch: Mapping[str, Any], source: str) -> None:
    """Catch an inconsistent LFQ arch section before it turns into a shape error inside the model."""
    dd = arch["ddconfig"]
    bits, n_embed = arch["embed_dim"], arch["n_embed"]
    if dd["z_channels"] != bits or n_embed != 2 ** bits:
        raise ConfigError(f"{source}: lookup-free quantization needs embed_dim = ddconfig.z_channels = "
                          f"log2(n_embed), got embed_dim {bits}, z_channels {dd['z_channels']}, n_embed {n_embed}")
    if not dd["ch_mult"]:
        raise ConfigError(f"{source}: ddconfig.ch_mult must list at least one level")
    widths = [dd["ch"]] + [dd["ch"] * m for m in dd["ch_mult"]]
    if any(w <= 0 or w % 32 for w in widths):
        raise ConfigError(f"{source}: ddconfig.ch * ch_mult must all be positive multiples of 32 (GroupNorm), "
                          f"got {widths}")
    f = 2 ** (len(dd["ch_mult"]) - 1)
    if arch["image_size"] % f or arch["image_size"] < 2 * f:
        raise ConfigError(f"{source}: image_size must be a multiple of {f} (2^(len(ch_mult)-1)) and at least "
                          f"{2 * f}, got {arch['image_size']}")

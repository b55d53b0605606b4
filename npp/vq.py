"""The LlamaGen VQ tokenizer (VQ-16: 256 px -> 16x16 codes of a 16384-entry, 8-dim codebook).

Images (B, 3, R, R) in [-1, 1] -> encoder -> quant_conv -> latents (B, 8, h, w) -> nearest
l2-normalised code -> post_quant_conv -> decoder -> images. A VQGAN-family autoencoder built from
the shared blocks of common/layers.py; module names follow the official state dict
(FoundationVision/LlamaGen `VQModel`), so released checkpoints load as they are.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.config import validate
from common.errors import ConfigError, DataError
from common.layers import AttnBlock, Level, Normalize, ResnetBlock
from common.tokenizer import DiscreteTokenizer
from npp.schema import VQ_ARCH

USAGE_WINDOW = 65536  # the official `codebook_used` buffer: the last 65536 chosen codes, whatever the codebook size


class VQLosses(NamedTuple):
    """Quantizer terms of the generator loss (zero in eval mode) and the codebook usage over the last window."""
    vq: torch.Tensor
    commit: torch.Tensor
    entropy: torch.Tensor
    usage: float


def mid_blocks(channels: int, dropout: float) -> nn.ModuleList:
    """`mid.0` residual, `mid.1` attention, `mid.2` residual, at the lowest resolution."""
    return nn.ModuleList([ResnetBlock(channels, channels, dropout), AttnBlock(channels),
                          ResnetBlock(channels, channels, dropout)])


class Encoder(nn.Module):
    """Images (B, 3, R, R) -> (B, z_channels, R/f, R/f), f = 2^(L-1); attention only at the last level."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float):
        super().__init__()
        widths = [ch] + [ch * m for m in ch_mult]
        last = len(ch_mult) - 1
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, padding=1)
        self.conv_blocks = nn.ModuleList(
            Level(widths[i], widths[i + 1], num_res_blocks, i == last, dropout,
                  resample=None if i == last else "down", blocks_key="res")
            for i in range(len(ch_mult)))
        self.mid = mid_blocks(widths[-1], dropout)
        self.norm_out = Normalize(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, r, r) -> images (B, 3, f*r, f*r), unclamped. `conv_blocks.0` is the lowest
    resolution (run first, with attention); each stage has num_res_blocks + 1 residual blocks."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float):
        super().__init__()
        widths = [ch * m for m in reversed(ch_mult)]  # stage j works at width ch * ch_mult[L-1-j]
        self.conv_in = nn.Conv2d(z_channels, widths[0], kernel_size=3, padding=1)
        self.mid = mid_blocks(widths[0], dropout)
        last = len(ch_mult) - 1
        self.conv_blocks = nn.ModuleList(
            Level(widths[max(j - 1, 0)], widths[j], num_res_blocks + 1, j == 0, dropout,
                  resample=None if j == last else "up", blocks_key="res")
            for j in range(len(ch_mult)))
        self.norm_out = Normalize(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Mean per-position entropy minus the entropy of the mean distribution, of softmax(affinity / T)."""
    logits = affinity / temperature
    probs = F.softmax(logits, dim=-1)
    per_position = -(probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    mean_probs = probs.mean(0)
    of_mean = -(mean_probs * torch.log(mean_probs + 1e-5)).sum()
    return per_position - of_mean


class L2VectorQuantizer(nn.Module):
    """Nearest code by Euclidean distance between the l2-normalised latent and l2-normalised codes."""

    def __init__(self, codebook_size: int, dim: int, commit_beta: float, entropy_ratio: float):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.register_buffer("codebook_used", torch.zeros(USAGE_WINDOW))
        self.commit_beta = commit_beta
        self.entropy_ratio = entropy_ratio

    def codes_to_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (...) -> their normalised vectors (..., dim)."""
        return F.embedding(codes, F.normalize(self.embedding.weight, dim=-1))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, VQLosses, torch.Tensor]:
        """Latents (B, dim, h, w) -> (quantized (B, dim, h, w), VQLosses, codes (B, h, w) int64)."""
        z = F.normalize(z.permute(0, 2, 3, 1), dim=-1)  # (B, h, w, dim)
        codebook = F.normalize(self.embedding.weight, dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        # |z|^2 + |e|^2 - 2 z.e, in this form: the official codes are its argmin (first index on ties)
        distance = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        codes = distance.argmin(1)
        chosen = codebook[codes].view_as(z)
        zero = z.new_zeros(())
        losses = VQLosses(zero, zero, zero, 0.0)
        if self.training:
            losses = VQLosses(vq=F.mse_loss(chosen, z.detach()),
                              commit=self.commit_beta * F.mse_loss(chosen.detach(), z),
                              entropy=self.entropy_ratio * entropy_loss(-distance) if self.entropy_ratio else zero,
                              usage=self.record_usage(codes))
        quantized = z + (chosen - z).detach()  # straight-through
        return quantized.permute(0, 3, 1, 2).contiguous(), losses, codes.view(z.shape[:3])

    @torch.no_grad()
    def record_usage(self, codes: torch.Tensor) -> float:
        """Push the codes into the FIFO window; return the fraction of the codebook seen in it
        (the window's initial zeros count as code 0, as officially)."""
        n = min(codes.numel(), USAGE_WINDOW)
        used = torch.cat([self.codebook_used[n:], codes[-n:].to(self.codebook_used.dtype)])
        self.codebook_used.copy_(used)
        return used.unique().numel() / self.embedding.num_embeddings


class VQTokenizer(DiscreteTokenizer):
    """Images <-> codes (B, h, w) in [0, codebook_size) (the interface of common/tokenizer.py)."""

    def __init__(self, codebook_size: int = 16384, codebook_embed_dim: int = 8,
                 encoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4), decoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 z_channels: int = 256, dropout_p: float = 0.0, ch: int = 128, num_res_blocks: int = 2,
                 commit_loss_beta: float = 0.25, entropy_loss_ratio: float = 0.0, image_size: int = 256):
        super().__init__()
        self.encoder = Encoder(ch, encoder_ch_mult, num_res_blocks, z_channels, dropout_p)
        self.decoder = Decoder(ch, decoder_ch_mult, num_res_blocks, z_channels, dropout_p)
        self.quantize = L2VectorQuantizer(codebook_size, codebook_embed_dim, commit_loss_beta, entropy_loss_ratio)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, kernel_size=1)
        self.resolution = image_size
        self.downsample_factor = 2 ** (len(encoder_ch_mult) - 1)

    @classmethod
    def from_config(cls, arch: Mapping[str, Any], source: str = "config") -> "VQTokenizer":
        """Build from the `arch` section of a config (see npp/schema.py)."""
        arch = validate(arch, VQ_ARCH, source, prefix="arch.")
        check_arch(arch, source)
        return cls(arch["codebook_size"], arch["codebook_embed_dim"], arch["encoder_ch_mult"],
                   arch["decoder_ch_mult"], arch["z_channels"], arch["dropout_p"], arch["ch"],
                   arch["num_res_blocks"], arch["commit_loss_beta"], arch["entropy_loss_ratio"], arch["image_size"])

    @property
    def vocab_size(self) -> int:
        return self.quantize.embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, VQLosses, torch.Tensor]:
        """Images -> (reconstruction, VQLosses, codes (B, h, w)). In training mode the usage window advances."""
        quantized, losses, codes = self.quantize(self.encode(x))
        return self.decode(quantized), losses, codes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> latents (B, codebook_embed_dim, H/f, W/f), before normalisation."""
        self.check_images(x)
        return self.quant_conv(self.encoder(x))

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, codebook_embed_dim, h, w) -> images (B, 3, f*h, f*w), unclamped."""
        return self.decoder(self.post_quant_conv(quantized))

    @torch.no_grad()
    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> codes (B, h, w), int64."""
        return self.quantize(self.encode(x))[2]

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> the normalised code vectors (B, codebook_embed_dim, h, w)."""
        return self.quantize.codes_to_vectors(codes).permute(0, 3, 1, 2)

    def check_images(self, x: torch.Tensor) -> None:
        """Refuse input that is not a float batch (B, 3, H, W) with H, W multiples of f."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point() or x.shape[2] % f or x.shape[3] % f:
            raise DataError(f"images must be a float tensor (B, 3, H, W) in [-1, 1] with H and W multiples of {f} "
                            f"(e.g. {self.resolution}x{self.resolution}), got {x.dtype} {tuple(x.shape)}")


def check_arch(arch: Mapping[str, Any], source: str) -> None:
    """Catch an inconsistent VQ arch section before it turns into a shape error inside the model."""
    if len(arch["encoder_ch_mult"]) != len(arch["decoder_ch_mult"]) or not arch["encoder_ch_mult"]:
        raise ConfigError(f"{source}: arch.encoder_ch_mult and arch.decoder_ch_mult must have the same, non-zero "
                          f"length, got {arch['encoder_ch_mult']} and {arch['decoder_ch_mult']}")
    widths = [arch["ch"]] + [arch["ch"] * m for m in arch["encoder_ch_mult"] + arch["decoder_ch_mult"]]
    if any(w <= 0 or w % 32 for w in widths):
        raise ConfigError(f"{source}: arch.ch times every ch_mult must be a positive multiple of 32 (GroupNorm), "
                          f"got {widths}")
    f = 2 ** (len(arch["encoder_ch_mult"]) - 1)
    if arch["image_size"] % f:
        raise ConfigError(f"{source}: arch.image_size must be a multiple of {f} (2^(len(ch_mult)-1)), "
                          f"got {arch['image_size']}")

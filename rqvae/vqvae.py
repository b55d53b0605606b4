"""RQ-VAE: a VQGAN-style convolutional autoencoder with a residual quantizer in the middle.

Images (B, 3, R, R) in [-1, 1] -> encoder -> latents (B, H, W, C) -> residual quantizer ->
codes (B, h, w, D) -> sum of code vectors -> decoder -> images. Module names follow the
official state dict (kakaobrain/rq-vae-transformer), so released checkpoints load as they are.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.config import validate
from common.errors import ConfigError, DataError
from common.layers import AttnBlock, Level, Normalize, ResnetBlock
from common.tokenizer import Tokenizer
from rqvae.quantizer import RQBottleneck
from rqvae.schema import RQVAE_ARCH


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
    """Images (B, in_channels, R, R) -> features (B, z_channels, R / 2^(L-1), R / 2^(L-1)), L = len(ch_mult)."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 resolution: int, in_channels: int, z_channels: int, dropout: float = 0.0,
                 checkpointing: bool = False):
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
        self.conv_out = nn.Conv2d(widths[-1], z_channels, kernel_size=3, padding=1)

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


class RQVAE(Tokenizer):
    """The RQ-VAE tokenizer: images <-> codes (B, h, w, D) in [0, n_embed).

    The interface of common/tokenizer.py, plus `embed_codes_with_depth` for the RQ-Transformer's inputs.
    """

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int, n_embed: int,
                 latent_shape: Sequence[int], code_shape: Sequence[int], decay: float = 0.99,
                 shared_codebook: bool = False, restart_unused_codes: bool = True, checkpointing: bool = False):
        super().__init__()
        dd = {k: ddconfig[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution",
                                       "z_channels", "dropout")}
        self.encoder = Encoder(**dd, in_channels=ddconfig["in_channels"], checkpointing=checkpointing)
        self.decoder = Decoder(**dd, out_ch=ddconfig["out_ch"], checkpointing=checkpointing)
        self.quantizer = RQBottleneck(latent_shape, code_shape, n_embed, decay, shared_codebook, restart_unused_codes)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], kernel_size=1)
        self.in_channels = ddconfig["in_channels"]
        self.resolution = ddconfig["resolution"]
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)

    @classmethod
    def from_config(cls, arch: Mapping[str, Any], source: str = "config") -> "RQVAE":
        """Build from the `arch` section of a stage-1 config (ours or an official config.yaml)."""
        arch = validate(arch, RQVAE_ARCH, source, prefix="arch.")
        hp, dd = arch["hparams"], arch["ddconfig"]
        check_arch(hp, dd, source)
        return cls(dd, hp["embed_dim"], hp["n_embed"], hp["latent_shape"], hp["code_shape"], hp["decay"],
                   hp["shared_codebook"], hp["restart_unused_codes"], arch["checkpointing"])

    # -- the tokenizer interface ----------------------------------------------------------------

    @property
    def code_shape(self) -> tuple[int, int, int]:
        return self.quantizer.code_shape

    @property
    def vocab_size(self) -> int:
        return self.quantizer.n_embed

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images -> (reconstruction, commitment loss, codes). In training mode the codebooks take an EMA step."""
        z = self.encode(x)  # (B, H, W, C)
        z_q, commitment_loss, codes = self.quantizer(z)
        return self.decode(z_q), commitment_loss, codes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) -> latents (B, H, W, C), channels last."""
        self.check_images(x)
        h = self.quant_conv(self.encoder(x))  # (B, C, H, W)
        return h.permute(0, 2, 3, 1).contiguous()

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, H, W, C) -> images (B, 3, R, R), unclamped."""
        h = self.post_quant_conv(z_q.permute(0, 3, 1, 2).contiguous())  # (B, z_channels, H, W)
        return self.decoder(h)

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> codes (B, h, w, D), int64. Like `forward`, a model in training mode updates its codebooks."""
        return self.quantizer(self.encode(x))[2]

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w, D) -> the code vectors summed over depth (B, h, w, C), what `decode` reads."""
        return self.quantizer.embed_codes(codes)

    @torch.no_grad()
    def decode_partial_codes(self, codes: torch.Tensor, depth: int, mode: str = "select") -> torch.Tensor:
        """Decode only the codes of `depth` (mode "select") or the sum of depths 0..depth (mode "add")."""
        return self.decode(self.quantizer.embed_codes(codes, depth, mode))

    def embed_codes_with_depth(self, codes: torch.Tensor) -> torch.Tensor:
        """Per-depth code vectors, not summed: (B, h, w, D) -> (B, h, w, D, dim)."""
        return self.quantizer.embed_codes_with_depth(codes)

    @torch.no_grad()
    def soft_codes(self, x: torch.Tensor, temp: float = 1.0, stochastic: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (probabilities (B, h, w, D, n_embed), codes (B, h, w, D)); see RQBottleneck.soft_codes."""
        return self.quantizer.soft_codes(self.encode(x), temp, stochastic)

    def codebook_usage(self, codes: torch.Tensor) -> dict[str, float]:
        """Fraction of the codebook used and perplexity of the codes, per depth (`usage_d0`, `perplexity_d0`, ...)."""
        from common.metrics import codebook_usage  # here: the metrics package imports torch-fidelity, slow

        stats = {}
        for d in range(codes.shape[-1]):
            for name, value in codebook_usage(codes[..., d], self.vocab_size).items():
                stats[f"{name}_d{d}"] = value
        return stats

    def check_images(self, x: torch.Tensor) -> None:
        """Refuse input that is not a float batch (B, in_channels, H, W) with H, W multiples of the code grid."""
        step = self.downsample_factor * self.quantizer.shape_divisor[0]
        if (x.ndim != 4 or x.shape[1] != self.in_channels or not x.is_floating_point()
                or x.shape[2] % step or x.shape[3] % step):
            raise DataError(f"images must be a float tensor (B, {self.in_channels}, H, W) in [-1, 1] with H and W "
                            f"multiples of {step} (e.g. {self.resolution}), got {x.dtype} {tuple(x.shape)}")


def check_arch(hp: Mapping[str, Any], dd: Mapping[str, Any], source: str) -> None:
    """Catch an inconsistent RQ-VAE arch section before it turns into a shape error deep inside the model."""
    latent_shape, code_shape = hp["latent_shape"], hp["code_shape"]
    if len(latent_shape) != 3 or len(code_shape) != 3:
        raise ConfigError(f"{source}: arch.hparams.latent_shape and code_shape must have 3 entries "
                          f"[height, width, channels|depth], got {latent_shape} and {code_shape}")
    latent_res = dd["resolution"] // 2 ** (len(dd["ch_mult"]) - 1)
    if list(latent_shape) != [latent_res, latent_res, hp["embed_dim"]]:
        raise ConfigError(f"{source}: arch.hparams.latent_shape must be [{latent_res}, {latent_res}, "
                          f"{hp['embed_dim']}] (resolution / 2^(len(ch_mult)-1), embed_dim), got {latent_shape}")
    widths = [dd["ch"] * m for m in dd["ch_mult"]] + [dd["ch"]]
    if any(w % 32 for w in widths):
        raise ConfigError(f"{source}: arch.ddconfig.ch * ch_mult must all be multiples of 32 (GroupNorm), got {widths}")

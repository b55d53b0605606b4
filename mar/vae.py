"""The KL-16 VAE of MAR: a continuous tokenizer (256 px -> 16 x 16 latents of 16 channels).

Images (B, 3, R, R) in [-1, 1] -> encoder (mean and log-variance channels) -> quant_conv ->
moments (B, 2C, h, w) -> posterior N(mean, exp(logvar)) -> a sample z (B, C, h, w) ->
post_quant_conv -> decoder -> images. A prior is trained on `z * scale_factor` and its samples
are decoded after dividing by it. Module names follow the released kl16.ckpt.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from common.autoencoder import Decoder, Encoder
from common.config import Config, read_yaml, validate
from common.errors import ConfigError, DataError
from common.tokenizer import ContinuousTokenizer, DiagonalGaussian
from mar.schema import VAE_ARCH, VAE_CONFIG


class KLVAE(ContinuousTokenizer):
    """KL-regularised autoencoder whose posterior samples, scaled, are MAR's tokens (C, h, w)."""

    def __init__(self, embed_dim: int = 16, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, resolution: int = 256, encoder_attn_resolutions: Sequence[int] = (16,),
                 decoder_attn_resolutions: Sequence[int] = (), dropout: float = 0.0, scale_factor: float = 0.2325,
                 z_channels: int | None = None, double_z: bool = True, in_channels: int = 3, out_ch: int = 3,
                 checkpointing: bool = False):
        super().__init__()
        z_channels = z_channels or embed_dim
        shared = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, resolution=resolution,
                      z_channels=z_channels, dropout=dropout, checkpointing=checkpointing)
        self.encoder = Encoder(**shared, attn_resolutions=encoder_attn_resolutions, in_channels=in_channels,
                               double_z=double_z)
        self.decoder = Decoder(**shared, attn_resolutions=decoder_attn_resolutions, out_ch=out_ch)
        self.quant_conv = nn.Conv2d(2 * z_channels if double_z else z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self.channels = embed_dim
        self.scale_factor = scale_factor
        self.in_channels = in_channels
        self.resolution = resolution
        self.downsample_factor = 2 ** (len(ch_mult) - 1)

    @classmethod
    def from_config(cls, arch: Mapping[str, Any], source: str = "config") -> "KLVAE":
        """Build from the `arch` section of a config (see mar/schema.py)."""
        arch = validate(arch, VAE_ARCH, source, prefix="arch.")
        check_arch(arch, source)
        return cls(**{key: value for key, value in arch.items() if key != "type"})  # the fields are our arguments

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Images -> (reconstruction of a posterior sample, or of its mean, and the posterior) for training."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()  # (B, C, h, w), unscaled
        return self.decode(z), posterior

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (B, 3, R, R) -> the posterior over the (unscaled) latents."""
        return DiagonalGaussian(self.encode_moments(x))

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) -> moments (B, 2C, h, w): channels [0, C) the mean, [C, 2C) the raw log-variance."""
        self.check_images(x)
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> images (B, 3, R, R), unclamped."""
        return self.decoder(self.post_quant_conv(z))

    def check_images(self, x: torch.Tensor) -> None:
        """Refuse input that is not a float batch (B, in_channels, H, W) with H, W multiples of the downsampling."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.in_channels or not x.is_floating_point() or x.shape[2] % f \
                or x.shape[3] % f:
            raise DataError(f"images must be a float tensor (B, {self.in_channels}, H, W) in [-1, 1] with H and W "
                            f"multiples of {f} (e.g. {self.resolution}), got {x.dtype} {tuple(x.shape)}")


def check_arch(arch: Mapping[str, Any], source: str) -> None:
    """Catch an inconsistent VAE arch section before it turns into a shape error inside the model."""
    if not arch["ch_mult"]:
        raise ConfigError(f"{source}: arch.ch_mult must have at least one entry")
    widths = [arch["ch"]] + [arch["ch"] * m for m in arch["ch_mult"]]
    if any(w <= 0 or w % 32 for w in widths):
        raise ConfigError(f"{source}: arch.ch times every ch_mult must be a positive multiple of 32 (GroupNorm), "
                          f"got {widths}")
    f = 2 ** (len(arch["ch_mult"]) - 1)
    if arch["resolution"] % f:
        raise ConfigError(f"{source}: arch.resolution must be a multiple of {f} (2^(len(ch_mult)-1)), "
                          f"got {arch['resolution']}")


def read_vae_config(path: str) -> Config:
    """A KL-VAE tokenizer config (ours: `arch.type: kl-vae`), validated."""
    data = read_yaml(path)
    if not isinstance(data.get("arch"), Mapping) or data["arch"].get("type") != "kl-vae":
        raise ConfigError(f"{path}: not a KL-VAE config (arch.type must be kl-vae)")
    return validate(data, VAE_CONFIG, path)

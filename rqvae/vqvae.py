"""RQ-VAE: a VQGAN-style convolutional autoencoder with a residual quantizer in the middle.

Images (B, 3, R, R) in [-1, 1] -> encoder -> latents (B, H, W, C) -> residual quantizer ->
codes (B, h, w, D) -> sum of code vectors -> decoder -> images. Module names follow the
official state dict (kakaobrain/rq-vae-transformer), so released checkpoints load as they are.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from common.autoencoder import Decoder, Encoder
from common.config import validate
from common.errors import ConfigError, DataError
from common.tokenizer import DiscreteTokenizer
from rqvae.quantizer import RQBottleneck
from rqvae.schema import RQVAE_ARCH


class RQVAE(DiscreteTokenizer):
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
    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
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

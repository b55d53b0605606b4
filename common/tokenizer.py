"""The tokenizer interface every stage-1 model shares, so that any prior can run on any tokenizer.

A tokenizer maps images (B, 3, R, R) in [-1, 1] to tokens of `token_shape` per image and back
(`encode_tokens`, `decode_tokens`). Tokens are of one of two kinds:

- discrete (`DiscreteTokenizer`): integer codes in [0, `vocab_size`) on an (h, w) grid, or
  (h, w, D) with a code depth D (residual quantization);
- continuous (`ContinuousTokenizer`): latents (C, h, w) scaled by `scale_factor`; the encoder
  gives the `moments` (mean and log-variance) of a diagonal Gaussian posterior, and a sample of
  that posterior is the prior's training target. Caches store the moments, so each epoch draws
  a fresh sample, as the official MAR loader does.

Subclasses have an `encoder`, a `decoder` ending in `conv_out`, a `resolution` and a
`downsample_factor`, and implement `encode` and `decode`; a discrete one also `vocab_size` and
`codes_to_latent`, a continuous one `encode_moments`, `channels` and `scale_factor`.
"""
from __future__ import annotations

import torch
from torch import nn

from common.errors import ConfigError, DataError

DISCRETE, CONTINUOUS = "discrete", "continuous"


class Tokenizer(nn.Module):
    kind: str
    resolution: int
    downsample_factor: int

    @property
    def image_size(self) -> int:
        return self.resolution

    def work_at(self, image_size: int, source: str) -> None:
        """Encode and decode images of `image_size` px from now on: its codes follow the image size (the
        tokenizer is convolutional), as LlamaGen's --image-size builds its VQ."""
        if image_size < self.downsample_factor or image_size % self.downsample_factor:
            raise ConfigError(f"{source} {image_size}: the tokenizer works at multiples of its downsampling factor "
                              f"{self.downsample_factor}")
        own, self.resolution = self.resolution, image_size
        if self.kind == DISCRETE and tuple(self.code_shape[:2]) != (self.latent_side, self.latent_side):
            self.resolution = own  # an RQ-VAE's code grid is set by its config, not by the image size
            raise ConfigError(f"{source} {image_size}: this tokenizer's code grid is fixed by its config "
                              f"({'x'.join(map(str, self.code_shape))}); it works at {own} px only")

    @property
    def latent_side(self) -> int:
        return self.resolution // self.downsample_factor

    @property
    def token_shape(self) -> tuple[int, ...]:
        """The shape of one image's tokens."""
        raise NotImplementedError

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, against which the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) -> tokens (B, *token_shape): what a prior is trained on."""
        raise NotImplementedError

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, *token_shape) -> images (B, 3, R, R), unclamped."""
        raise NotImplementedError

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images -> (reconstruction, unclamped; codes, or None without a codebook): what reconstruction
        metrics score."""
        raise NotImplementedError


class DiscreteTokenizer(Tokenizer):
    kind = DISCRETE

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def code_shape(self) -> tuple[int, ...]:
        """(h, w) of one image's codes (models with code depth add D)."""
        return self.latent_side, self.latent_side

    @property
    def token_shape(self) -> tuple[int, ...]:
        return tuple(self.code_shape)

    @property
    def code_depth(self) -> int:
        """Codes per position: D of an (h, w, D) code grid, else 1."""
        shape = tuple(self.code_shape)
        return shape[2] if len(shape) == 3 else 1

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> the quantized latent `decode` reads."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Through the quantizer; a model in training mode would update an EMA codebook, so call it in eval mode."""
        reconstruction, _, codes = self(images)
        return reconstruction, codes

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codes (B, *code_shape) -> images (B, 3, R, R), unclamped."""
        self.check_codes(tokens)
        return self.decode(self.codes_to_latent(tokens))

    def check_codes(self, codes: torch.Tensor) -> None:
        """Refuse anything but integer codes (B, *code grid) within the vocabulary."""
        dims = ", ".join(("B", "h", "w", "D")[:1 + len(self.code_shape)])
        if (codes.ndim != 1 + len(self.code_shape) or codes.is_floating_point() or codes.min() < 0
                or codes.max() >= self.vocab_size):
            raise DataError(f"codes must be an integer tensor ({dims}) with values in [0, {self.vocab_size}), "
                            f"got {codes.dtype} {tuple(codes.shape)}")


class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) of a KL autoencoder, from `moments` (B, 2C, ...) = [mean | logvar]."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * one standard normal draw of the mean's shape (the global RNG unless `generator`)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I), summed over all but the batch dimension: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class ContinuousTokenizer(Tokenizer):
    kind = CONTINUOUS
    channels: int  # latent channels C
    scale_factor: float  # tokens = posterior sample * scale_factor

    @property
    def token_shape(self) -> tuple[int, ...]:
        return self.channels, self.latent_side, self.latent_side

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) -> posterior moments (B, 2C, h, w): what a latent cache stores."""
        raise NotImplementedError

    def tokens_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None
                            ) -> torch.Tensor:
        """A posterior sample, scaled: the training target (B, C, h, w)."""
        return DiagonalGaussian(moments).sample(generator) * self.scale_factor

    @torch.no_grad()
    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens_from_moments(self.encode_moments(images))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The decoded posterior mean: the deterministic reconstruction."""
        return self.decode(DiagonalGaussian(self.encode_moments(images)).mode()), None

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, R, R), unclamped."""
        if tokens.ndim != 4 or tokens.shape[1] != self.channels or not tokens.is_floating_point():
            raise DataError(f"latents must be a float tensor (B, {self.channels}, h, w), "
                            f"got {tokens.dtype} {tuple(tokens.shape)}")
        return self.decode(tokens / self.scale_factor)

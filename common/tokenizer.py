"""The tokenizer interface every stage-1 model shares, so that any prior can run on any tokenizer.

A tokenizer maps images (B, 3, R, R) in [-1, 1] to integer codes of `code_shape` per image and back.
Subclasses have an `encoder`, a `decoder` ending in `conv_out`, a `resolution` and a
`downsample_factor`, and implement `encode`, `decode`, `codes_to_latent`, `encode_codes` and
`vocab_size`; the rest is here.
"""
from __future__ import annotations

import torch
from torch import nn

from common.errors import DataError


class Tokenizer(nn.Module):
    resolution: int
    downsample_factor: int

    @property
    def code_shape(self) -> tuple[int, ...]:
        """(h, w) of one image's codes at `image_size` (models with code depth add D)."""
        side = self.resolution // self.downsample_factor
        return side, side

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        return self.resolution

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, against which the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    def codes_to_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> the quantized latent `decode` reads."""
        raise NotImplementedError

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, *code_shape) -> images (B, 3, R, R), unclamped."""
        self.check_codes(codes)
        return self.decode(self.codes_to_latent(codes))

    def check_codes(self, codes: torch.Tensor) -> None:
        """Refuse anything but integer codes (B, *code grid) within the vocabulary."""
        dims = ", ".join(("B", "h", "w", "D")[:1 + len(self.code_shape)])
        if (codes.ndim != 1 + len(self.code_shape) or codes.is_floating_point() or codes.min() < 0
                or codes.max() >= self.vocab_size):
            raise DataError(f"codes must be an integer tensor ({dims}) with values in [0, {self.vocab_size}), "
                            f"got {codes.dtype} {tuple(codes.shape)}")

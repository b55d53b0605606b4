"""A discrete tokenizer's codes in the layout a prior of another method models (any prior on any tokenizer).

Each prior models codes of one layout: the RQ-Transformer a grid with a depth (h, w, D), the GPT a
square grid (g, g). On a tokenizer whose codes are laid out otherwise, the prior sees the same codes
rearranged, by one of two conventions:

- **depth 1**: the codes (h, w) of a tokenizer without code depth (LlamaGen VQ, Open-MAGVIT2) are
  (h, w, 1) to a prior with a depth axis;
- **folded depth**: residual codes (h, w, D) with D = s * s are the (h s, w s) grid of a prior without
  one: the D codes of position (i, j) fill the s x s block at rows i s .. i s + s - 1 and columns
  j s .. j s + s - 1, depth d at row d // s and column d % s of the block. Raster order over this grid
  reaches every depth of a position after the depths before it, and s x s patches of it are positions.

`CodeView` wraps the tokenizer so that `encode_tokens` / `decode_tokens` speak the prior's layout:
training tasks and samplers hold the view in the tokenizer's place, and `arrange` rearranges codes
read from a cache (stored in the tokenizer's own layout). Only the layout changes, never the grid's
size: a convolutional tokenizer's codes follow the image size they were encoded at.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from common.tokenizer import DISCRETE, DiscreteTokenizer, Tokenizer


def with_depth(code_shape: Sequence[int]) -> tuple[int, ...]:
    """The (h, w, D) layout of codes of shape `code_shape`: (h, w) -> (h, w, 1)."""
    return tuple(code_shape) if len(code_shape) == 3 else (*code_shape, 1)


def folded(code_shape: Sequence[int]) -> tuple[int, ...] | None:
    """The (h s, w s) layout of codes of shape `code_shape` (h, w) or (h, w, s * s); None when the depth is not a
    square."""
    if len(code_shape) == 2:
        return tuple(code_shape)
    h, w, depth = code_shape
    side = math.isqrt(depth)
    return (h * side, w * side) if side * side == depth else None


class CodeView(DiscreteTokenizer):
    """`tokenizer` with its codes in the layout of a prior whose code grids have `rank` axes: 3, (h, w) codes with a
    depth of 1; 2, (h, w, s * s) codes folded."""

    def __init__(self, tokenizer: DiscreteTokenizer, rank: int):
        super().__init__()
        own = tuple(tokenizer.code_shape)
        self.depth_axis = rank == 3
        self.view_shape = with_depth(own) if self.depth_axis else folded(own)
        if (len(own), rank) not in ((2, 3), (3, 2)) or self.view_shape is None:
            raise ValueError(f"codes of shape {list(own)} have no layout with {rank} axes")
        self.tokenizer = tokenizer
        self.fold = math.isqrt(own[-1]) if len(own) == 3 else 1
        self.resolution = tokenizer.resolution
        self.downsample_factor = tokenizer.downsample_factor

    @property
    def code_shape(self) -> tuple[int, ...]:
        return self.view_shape

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def last_layer(self) -> torch.Tensor:
        return self.tokenizer.last_layer

    def arrange(self, codes: torch.Tensor) -> torch.Tensor:
        """The tokenizer's codes (B, h, w[, s * s]) -> the prior's (B, h, w, 1) or (B, h s, w s)."""
        if self.depth_axis:
            return codes.unsqueeze(-1)
        B, h, w, _ = codes.shape
        s = self.fold
        return codes.reshape(B, h, w, s, s).permute(0, 1, 3, 2, 4).reshape(B, h * s, w * s)

    def restore(self, codes: torch.Tensor) -> torch.Tensor:
        """The prior's codes -> the tokenizer's: the inverse of `arrange`."""
        if self.depth_axis:
            return codes[..., 0]
        B, height, width = codes.shape
        s = self.fold
        return codes.reshape(B, height // s, s, width // s, s).permute(0, 1, 3, 2, 4).reshape(
            B, height // s, width // s, s * s)

    @torch.no_grad()
    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.arrange(self.tokenizer.encode_tokens(images))

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_codes(tokens)
        return self.tokenizer.decode_tokens(self.restore(tokens))


def view_for(tokenizer: Tokenizer, prior: nn.Module) -> Tokenizer:
    """The tokenizer as `prior` sees it: itself when its code grids have as many axes as the prior's `code_shape`
    (or its tokens are continuous), else a CodeView."""
    shape = getattr(prior, "code_shape", None)
    if tokenizer.kind != DISCRETE or shape is None or len(shape) == len(tokenizer.code_shape):
        return tokenizer
    return CodeView(tokenizer, len(shape))


def arrange_codes(tokenizer: Tokenizer, codes: torch.Tensor) -> torch.Tensor:
    """Cached codes (in the tokenizer's own layout) in the layout of `tokenizer`, a view or the tokenizer itself."""
    return tokenizer.arrange(codes) if isinstance(tokenizer, CodeView) else codes

"""Residual quantizer of RQ-VAE: D codebooks applied in turn to what the previous ones left over.

The codebooks are trained by exponential moving averages of the vectors assigned to each
code (not by gradients), with a restart of codes that fell out of use.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.dist import is_distributed
from common.errors import ConfigError, DataError


class VQEmbedding(nn.Module):
    """One codebook of `n_embed` vectors, updated by EMA in training mode.

    `weight` has one extra all-zero row (index n_embed) kept for layout compatibility with the
    official checkpoints; it never takes part in the nearest-code search and is never updated.
    """

    def __init__(self, n_embed: int, dim: int, decay: float = 0.99, restart_unused_codes: bool = True,
                 eps: float = 1e-5):
        super().__init__()
        self.n_embed = n_embed
        self.decay = decay
        self.restart_unused_codes = restart_unused_codes
        self.eps = eps
        weight = torch.randn(n_embed + 1, dim)
        weight[-1] = 0.0
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("cluster_size_ema", torch.zeros(n_embed))
        self.register_buffer("embed_ema", weight[:-1].clone())

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    @torch.no_grad()
    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distance of each vector of `x` (..., dim) to every code: (..., n_embed)."""
        codebook = self.weight[:-1]
        x_flat = x.reshape(-1, self.dim)
        sq_norms = x_flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None]
        distances = torch.addmm(sq_norms, x_flat, codebook.t(), alpha=-2.0)
        return distances.reshape(*x.shape[:-1], self.n_embed)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes of `x` (..., dim) and their vectors; in training also one EMA step."""
        codes = self.distances(x).argmin(-1)
        embeds = self.embed(codes)  # looked up before this call's update, as the official code does
        if self.training:
            self.ema_update(x, codes)
        return embeds, codes

    @torch.no_grad()
    def ema_update(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Move the codebook towards the mean of its assigned vectors (Laplace-smoothed counts)."""
        x = x.reshape(-1, self.dim)
        one_hot = F.one_hot(codes.reshape(-1), self.n_embed).type_as(x)  # (N, n_embed)
        counts = one_hot.sum(0)
        sums = one_hot.t() @ x  # (n_embed, dim)
        if is_distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size_ema.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_ema.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        if self.restart_unused_codes:
            self.restart_unused(x)

        n = self.cluster_size_ema.sum()
        smoothed_sizes = n * (self.cluster_size_ema + self.eps) / (n + self.n_embed * self.eps)
        self.weight[:-1] = self.embed_ema / smoothed_sizes[:, None]

    def restart_unused(self, x: torch.Tensor) -> None:
        """Codes whose EMA count fell below 1 take a random vector of the current batch."""
        if x.shape[0] < self.n_embed:  # too few vectors: repeat them with a little noise
            x = x.repeat(math.ceil(self.n_embed / x.shape[0]), 1)
            x = x + torch.rand_like(x) * (0.01 / math.sqrt(self.dim))
        random_rows = x[torch.randperm(x.shape[0], device=x.device)][: self.n_embed]
        if is_distributed():
            dist.broadcast(random_rows, 0)  # every process restarts with rank 0's choice
        unused = self.cluster_size_ema < 1
        self.embed_ema.copy_(torch.where(unused[:, None], random_rows, self.embed_ema))
        self.cluster_size_ema.masked_fill_(unused, 1.0)


class RQBottleneck(nn.Module):
    """Residual quantization of (B, H, W, C) latents into (B, h, w, D) codes.

    Each rH x rW patch of the latent (rH = H / h, rW = W / w) is one vector of rH*rW*C numbers,
    quantized by D codebooks in turn. With `shared_codebook` one codebook serves every depth (held D
    times, so the state dict lists it D times, as in the official checkpoints).
    """

    def __init__(self, latent_shape: tuple[int, int, int], code_shape: tuple[int, int, int], n_embed: int,
                 decay: float = 0.99, shared_codebook: bool = False, restart_unused_codes: bool = True):
        super().__init__()
        if len(latent_shape) != 3 or len(code_shape) != 3:
            raise ConfigError(f"latent_shape {list(latent_shape)} and code_shape {list(code_shape)} must be "
                              "[height, width, channels] and [height, width, depth]")
        if latent_shape[0] % code_shape[0] or latent_shape[1] % code_shape[1]:
            raise ConfigError(f"code_shape {list(code_shape)} must divide latent_shape {list(latent_shape)} "
                              "in height and width")
        self.latent_shape = tuple(latent_shape)
        self.code_shape = tuple(code_shape)
        self.shape_divisor = (latent_shape[0] // code_shape[0], latent_shape[1] // code_shape[1])
        self.n_embed = n_embed
        self.shared_codebook = shared_codebook
        dim = self.shape_divisor[0] * self.shape_divisor[1] * latent_shape[2]
        depth = code_shape[2]
        if shared_codebook:
            self.codebooks = nn.ModuleList([VQEmbedding(n_embed, dim, decay, restart_unused_codes)] * depth)
        else:
            self.codebooks = nn.ModuleList(VQEmbedding(n_embed, dim, decay, restart_unused_codes)
                                           for _ in range(depth))

    # -- folding between latent shape (B, H, W, C) and code shape (B, h, w, rH*rW*C) --------------

    def to_code_shape(self, z: torch.Tensor) -> torch.Tensor:
        B, H, W, C = z.shape
        rH, rW = self.shape_divisor
        z = z.reshape(B, H // rH, rH, W // rW, rW, C).permute(0, 1, 3, 2, 4, 5)
        return z.reshape(B, H // rH, W // rW, rH * rW * C)

    def to_latent_shape(self, x: torch.Tensor) -> torch.Tensor:
        B, h, w, _ = x.shape
        rH, rW = self.shape_divisor
        x = x.reshape(B, h, w, rH, rW, self.latent_shape[2]).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(B, h * rH, w * rW, self.latent_shape[2])

    # -- quantization ---------------------------------------------------------------------------

    def quantize(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residual loop: partial sums q_d = e_0 + ... + e_d for every depth d, and the codes (B, h, w, D)."""
        residual = x.detach()
        quantized = torch.zeros_like(residual)
        partial_sums, codes = [], []
        for codebook in self.codebooks:
            embeds, code = codebook(residual)  # nearest code of what is left; (B, h, w, dim), (B, h, w)
            residual = residual - embeds
            quantized = quantized + embeds
            partial_sums.append(quantized)
            codes.append(code)
        return partial_sums, torch.stack(codes, dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents (B, H, W, C) -> (quantized latents with straight-through gradient, commitment loss, codes)."""
        x = self.to_code_shape(z)
        partial_sums, codes = self.quantize(x)
        # the commitment loss averages over depth the error of every partial sum, not just the last
        commitment_loss = torch.stack([(x - q.detach()).pow(2).mean() for q in partial_sums]).mean()
        z_q = self.to_latent_shape(partial_sums[-1])
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q, commitment_loss, codes

    @torch.no_grad()
    def soft_codes(self, z: torch.Tensor, temp: float = 1.0, stochastic: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """softmax(-distance / temp) at each depth along the residual path: (B, h, w, D, n_embed), codes.

        The code of each depth is the nearest one, or a sample of that distribution if `stochastic`.
        """
        residual = self.to_code_shape(z)
        probs, codes = [], []
        for codebook in self.codebooks:
            distances = codebook.distances(residual)  # (B, h, w, n_embed)
            p = F.softmax(-distances / temp, dim=-1)
            if stochastic:
                code = torch.multinomial(p.reshape(-1, self.n_embed), 1).reshape(p.shape[:-1])
            else:
                code = distances.argmin(-1)
            residual = residual - codebook.embed(code)
            probs.append(p)
            codes.append(code)
        return torch.stack(probs, dim=-2), torch.stack(codes, dim=-1)

    # -- from codes back to vectors -------------------------------------------------------------

    def check_codes(self, codes: torch.Tensor) -> None:
        """Refuse codes that are not integers of depth D with values in [0, n_embed)."""
        depth = self.code_shape[2]
        if codes.is_floating_point() or codes.is_complex() or codes.ndim < 1 or codes.shape[-1] != depth:
            raise DataError(f"codes must be an integer tensor (..., {depth}), got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.n_embed):
            raise DataError(f"codes must lie in [0, {self.n_embed}), got values in "
                            f"[{int(codes.min())}, {int(codes.max())}]: codes of another tokenizer?")

    @torch.no_grad()
    def embed_codes_with_depth(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors of every depth, not summed: (..., D) -> (..., D, dim). Any spatial shape."""
        return torch.stack([codebook.embed(codes[..., d]) for d, codebook in enumerate(self.codebooks)], dim=-2)

    @torch.no_grad()
    def embed_codes(self, codes: torch.Tensor, depth: int | None = None, mode: str = "add") -> torch.Tensor:
        """Quantized latents (B, H, W, C) of codes (B, h, w, D).

        By default the sum over all depths; with `depth`, the sum over depths 0..depth (mode "add")
        or the vectors of that depth alone (mode "select").
        """
        self.check_codes(codes)
        embeds = self.embed_codes_with_depth(codes)  # (B, h, w, D, dim)
        if depth is None:
            x = embeds.sum(-2)
        elif not 0 <= depth < self.code_shape[2]:
            raise DataError(f"depth {depth} is out of range: the codes have depth {self.code_shape[2]}")
        elif mode == "add":
            x = embeds[..., : depth + 1, :].sum(-2)
        elif mode == "select":
            x = embeds[..., depth, :]
        else:
            raise DataError(f"partial decoding mode must be 'add' or 'select', got {mode!r}")
        return self.to_latent_shape(x)

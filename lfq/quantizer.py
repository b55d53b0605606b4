"""Lookup-free quantization (MAGVIT-2): the sign bits of a latent are its code, with entropy losses.

A latent vector z of K channels becomes q = sign(z) in {-1, +1}^K (z = 0 gives -1) and the
code sum_d [z_d > 0] 2^d: channel 0 is the least significant bit. There is no codebook to
learn; code k is the vector whose d-th entry is +1 where bit d of k is set, else -1.

Training adds two entropies of p_n = softmax(2 <z_n, c> / T) over all 2^K codes c (T = 0.01):
the mean per-token entropy (pushed down: confident tokens) and the entropy of the batch-average
distribution (pushed up: every code used). The official code materialises N x 2^K logits. Here
the same numbers come from the product structure of p_n: each bit is an independent
Bernoulli, p_n(c) = prod_d sigmoid(4 z_nd c_d / T), so the per-token entropy is a sum of binary
entropies and the batch average over all codes is one matrix product of the probabilities of the
low and the high half of the bits (`factorized_entropies`). `full_entropies` keeps the official
computation for tests and benchmarks.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ENTROPY_TEMPERATURE = 0.01
CODEBOOK_ENTROPY_EPS = 1e-5  # inside log(p_avg + eps); not negligible at 2^18 codes (1 / 2^18 < 1e-5)
ENTROPY_MODES = ("factorized", "full")


class LFQLosses(NamedTuple):
    """Auxiliary losses of one quantizer call (all zero in eval mode, as in the official code)."""

    entropy_aux: torch.Tensor  # sample_minimization_weight * per_sample_entropy - batch_maximization_weight * codebook_entropy
    per_sample_entropy: torch.Tensor
    codebook_entropy: torch.Tensor
    commitment: torch.Tensor  # mean (z - stopgrad(q))^2


# ----------------------------------------------------------------------------------------------
# Codes <-> latents
# ----------------------------------------------------------------------------------------------

def bit_table(num_bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(2^num_bits, num_bits) bool: row k holds the bits of k, least significant first."""
    powers = 2 ** torch.arange(num_bits, device=device)
    return (torch.arange(2 ** num_bits, device=device)[:, None] & powers) > 0


def latent_to_codes(z: torch.Tensor) -> torch.Tensor:
    """Latent (B, K, h, w) -> codes (B, h, w) int64: bit d is [z_d > 0]."""
    powers = 2 ** torch.arange(z.shape[1], device=z.device)
    return ((z > 0).long() * powers[:, None, None]).sum(1)


def codes_to_latent(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Codes (B, h, w) -> their +-1 latent (B, K, h, w), float32."""
    powers = 2 ** torch.arange(num_bits, device=codes.device)
    bits = (codes[..., None] & powers) > 0  # (B, h, w, K)
    return (2.0 * bits.float() - 1.0).permute(0, 3, 1, 2).contiguous()


def split_codes(codes: torch.Tensor, factorized_bits: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Full codes -> (pre, post) sub-codes of the AR stage: pre holds the first a bits, post the other b."""
    low_bits = factorized_bits[0]
    return codes & (2 ** low_bits - 1), codes >> low_bits


def merge_codes(pre: torch.Tensor, post: torch.Tensor, factorized_bits: Sequence[int]) -> torch.Tensor:
    """(pre, post) sub-codes -> full codes pre + 2^a * post."""
    return pre + (post << factorized_bits[0])


# ----------------------------------------------------------------------------------------------
# Entropies: official full softmax and the exact factorised form
# ----------------------------------------------------------------------------------------------

def full_entropies(z: torch.Tensor, temperature: float = ENTROPY_TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample entropy, codebook entropy) of latents z (N, K) through N x 2^K logits (official form)."""
    codebook = 2.0 * bit_table(z.shape[1], z.device).to(z.dtype) - 1.0  # (2^K, K)
    logits = 2.0 * z @ codebook.t() / temperature  # (N, 2^K)
    probs = logits.softmax(-1)
    per_sample = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    avg_probs = probs.mean(0)  # (2^K,)
    codebook_entropy = -(avg_probs * torch.log(avg_probs + CODEBOOK_ENTROPY_EPS)).sum()
    return per_sample, codebook_entropy


def pattern_probs(p_on: torch.Tensor, p_off: torch.Tensor) -> torch.Tensor:
    """Per-bit probabilities (N, k) of being set / unset -> probabilities (N, 2^k) of every k-bit pattern.

    Built one bit at a time: appending bit d doubles the table, unset patterns first, so the
    column index is the pattern read with bit 0 least significant.
    """
    probs = p_on.new_ones(p_on.shape[0], 1)
    for d in range(p_on.shape[1]):
        probs = torch.cat([probs * p_off[:, d:d + 1], probs * p_on[:, d:d + 1]], dim=1)
    return probs


def factorized_entropies(z: torch.Tensor, temperature: float = ENTROPY_TEMPERATURE
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The values of `full_entropies` (and their gradients) in O(N * 2^(K/2)) memory.

    Bit d of token n is set with probability sigmoid(4 z_nd / T). The batch-average distribution
    over all codes is avg[high, low] = mean_n P_high[n, high] * P_low[n, low], one GEMM.
    """
    N, K = z.shape
    logit_on = 4.0 * z / temperature  # (N, K): log-odds of each bit being set
    log_on, log_off = F.logsigmoid(logit_on), F.logsigmoid(-logit_on)  # log-sigmoid: |logit| reaches hundreds
    p_on, p_off = log_on.exp(), log_off.exp()
    per_sample = -(p_on * log_on + p_off * log_off).sum(-1).mean()  # sum of binary entropies

    low = K // 2
    probs_low = pattern_probs(p_on[:, :low], p_off[:, :low])  # (N, 2^low)
    probs_high = pattern_probs(p_on[:, low:], p_off[:, low:])  # (N, 2^(K-low))
    avg_probs = (probs_high.t() @ probs_low / N).flatten()  # (2^K,), index high * 2^low + low
    codebook_entropy = -(avg_probs * torch.log(avg_probs + CODEBOOK_ENTROPY_EPS)).sum()
    return per_sample, codebook_entropy


# ----------------------------------------------------------------------------------------------
# The quantizer
# ----------------------------------------------------------------------------------------------

class LookupFreeQuantizer(nn.Module):
    """Sign quantization of K-channel latents with a straight-through gradient; no parameters."""

    def __init__(self, num_bits: int, sample_minimization_weight: float = 1.0,
                 batch_maximization_weight: float = 1.0, entropy_mode: str = "factorized",
                 temperature: float = ENTROPY_TEMPERATURE):
        super().__init__()
        if entropy_mode not in ENTROPY_MODES:
            raise ValueError(f"entropy_mode must be one of {ENTROPY_MODES}, got {entropy_mode!r}")
        self.num_bits = num_bits
        self.sample_minimization_weight = sample_minimization_weight
        self.batch_maximization_weight = batch_maximization_weight
        self.entropy_mode = entropy_mode
        self.temperature = temperature

    @property
    def codebook_size(self) -> int:
        return 2 ** self.num_bits

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, LFQLosses, torch.Tensor]:
        """Latent (B, K, h, w) -> (quantized latent, losses, codes (B, h, w)).

        The quantized latent is z + stopgrad(q - z): the value of q, the gradient of z.
        """
        q = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
        quant = z + (q - z).detach()
        losses = self.losses(z, q) if self.training else LFQLosses(*[z.new_zeros((), dtype=torch.float32)] * 4)
        return quant, losses, latent_to_codes(z)

    def losses(self, z: torch.Tensor, q: torch.Tensor) -> LFQLosses:
        """Entropy terms over the N = B*h*w tokens of this batch (this process only) and commitment."""
        with torch.autocast(z.device.type, enabled=False):  # softmax-sized sums need fp32
            z = z.float()
            tokens = z.permute(0, 2, 3, 1).reshape(-1, self.num_bits)  # (N, K)
            entropies = factorized_entropies if self.entropy_mode == "factorized" else full_entropies
            per_sample, codebook = entropies(tokens, self.temperature)
            entropy_aux = self.sample_minimization_weight * per_sample - self.batch_maximization_weight * codebook
            commitment = F.mse_loss(z, q.float().detach())
        return LFQLosses(entropy_aux, per_sample, codebook, commitment)

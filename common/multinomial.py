"""`torch.multinomial(probs, 1)`'s draw, made cheap on the CPU without changing a single drawn token.

For one sample per row, torch.multinomial (with or without replacement) fills a float32 tensor of
probs' shape with Exp(1) noise from the generator and returns the argmax of probs / noise. On the CPU
the noise of entry i (in memory order) is -log1p(-u_i) computed in double and rounded to float32, where
u_i is the low 53 bits of the generator's i-th 64-bit word times 2^-53; `random_` on an int64 tensor
takes exactly the same words, one per entry, in a quarter of the time (no logarithm per entry). So the
draw here takes the words of the whole (B, V) tensor, which leaves the generator where torch.multinomial
leaves it, but turns into noise only the words of entries that can win: with `indices` (the tokens a
top-k filter kept, in index order) every other entry has probability 0, hence ratio 0, and cannot be
the argmax. The logarithm is torch's vectorised one in double, so a noise value can differ from the
scalar one in its last float32 bit about once in 5e8 values, which changes a token only if that value
decided a near-tie (tests/test_compact_draw.py compares both draws over many seeds). On other devices
torch.multinomial itself draws (its CUDA noise comes from another generator and is untested here).
"""
from __future__ import annotations

import torch

LOW_53_BITS = (1 << 53) - 1


def full_probs(probs: torch.Tensor, indices: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """The (B, V) distribution: `probs` itself, or `probs` (B, k) of the tokens `indices` (B, k) and zeros elsewhere."""
    if indices is None:
        return probs
    return probs.new_zeros(*probs.shape[:-1], vocab_size).scatter_(-1, indices, probs)


def multinomial_draw(probs: torch.Tensor, indices: torch.Tensor | None, vocab_size: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) int64: the token `torch.multinomial(full_probs(probs, indices, vocab_size), 1, generator=generator)`
    draws, with the generator (None: the global one) left in the same state."""
    if probs.device.type != "cpu":
        return torch.multinomial(full_probs(probs, indices, vocab_size), 1, generator=generator)[:, 0]
    if not bool(torch.isfinite(probs).all()):  # what torch.multinomial refuses
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    words = torch.empty(probs.shape[0], vocab_size, dtype=torch.int64).random_(generator=generator)
    if indices is not None:
        words = words.gather(-1, indices)
    uniform = (words & LOW_53_BITS).double().mul_(2.0 ** -53)
    noise = uniform.neg_().log1p_().neg_().float()  # Exp(1): -log(1 - u)
    best = (probs / noise).argmax(-1, keepdim=True)  # the first of equal ratios, as over the full row
    return (best if indices is None else indices.gather(-1, best))[:, 0]

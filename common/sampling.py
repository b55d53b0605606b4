"""Choosing the next token from a prior's logits: temperature, top-k, top-p, classifier-free guidance.

Shared by every autoregressive prior. The order of operations is that of the official
RQ-Transformer sampler: logits / temperature, top-k on the logits (ties at the k-th value are
kept), softmax, top-p on the probabilities (the token whose cumulative probability first reaches
p is kept, and so is the most likely token), renormalise, then ONE `torch.multinomial(probs, 1)`
draw for the whole batch, so a seeded run consumes the random generator exactly like the official one.
A disabled filter (top_k None or >= vocabulary, top_p None or >= 1) costs nothing. When top-k is
the only filter, the softmax and the draw run over the k kept tokens (the draw still takes the random
words of the whole vocabulary, common/multinomial.py): the same tokens at a fraction of the cost.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from common.errors import ConfigError
from common.multinomial import full_probs, multinomial_draw

KnobValue = int | float | Sequence[int | float] | None  # one value, or one per depth / group of steps


def check_sampling_knobs(temperature: float, top_k: KnobValue = None, top_p: KnobValue = None) -> None:
    """Refuse temperature <= 0, top_k < 1 and top_p outside (0, 1] with a one-line ConfigError."""
    if not temperature > 0:
        raise ConfigError(f"--temperature must be > 0, got {temperature}")
    for k in _as_list(top_k):
        if k is not None and (isinstance(k, bool) or int(k) != k or k < 1):
            raise ConfigError(f"--top-k must be >= 1, got {k}")
    for p in _as_list(top_p):
        if p is not None and not 0 < p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {p}")


def per_depth(value: KnobValue, depth: int, flag: str) -> list:
    """One knob value per depth: a single value (or one-entry list) for all, or a list of `depth` values."""
    values = _as_list(value)
    if len(values) == 1:
        return values * depth
    if len(values) != depth:
        raise ConfigError(f"{flag} takes one value or one per depth ({depth}), got {len(values)}: {list(values)}")
    return list(values)


def _as_list(value: KnobValue) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def top_k_active(top_k: int | None, vocab_size: int) -> bool:
    return top_k is not None and top_k < vocab_size


def top_p_active(top_p: float | None) -> bool:
    return top_p is not None and top_p < 1.0


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """True where a logit is below the k-th largest of its row (so ties at the k-th value survive)."""
    kth_value = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits < kth_value


def top_p_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """True for the tokens outside the nucleus: those ranked after the one whose cumulative probability reaches p."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    reached = torch.cumsum(sorted_probs, dim=-1) >= p
    outside = torch.zeros_like(reached)
    outside[..., 1:] = reached[..., :-1]  # shift by one: the crossing token and the top-1 stay
    return outside.scatter(-1, order, outside)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits (..., V) with the tokens removed by top-k, then top-p, set to -inf."""
    check_sampling_knobs(1.0, top_k, top_p)
    if top_k_active(top_k, logits.shape[-1]):
        logits = logits.masked_fill(top_k_mask(logits, top_k), float("-inf"))
    if top_p_active(top_p):
        logits = logits.masked_fill(top_p_mask(F.softmax(logits, dim=-1), top_p), float("-inf"))
    return logits


def kept_top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The k largest logits of each row (..., V) and their indices, both (..., k) in index order; None when a
    row ties at the k-th largest value (top-k keeps every tied token, so more than k survive: mask instead)."""
    values, indices = torch.topk(logits, k + 1, dim=-1)
    if bool((values[..., k] == values[..., k - 1]).any()):
        return None
    indices, order = indices[..., :k].sort(dim=-1)
    return values.gather(-1, order), indices


def sampling_distribution(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                          top_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distribution a token is drawn from, float32, computed as the official sampler does: (probs (B, V),
    None), or when top-k is the only filter (and no row ties at the k-th value) the same distribution without
    its zeros, (probs (B, k), indices (B, k)) of the kept tokens in index order."""
    check_sampling_knobs(temperature, top_k, top_p)
    logits = logits.float()
    if temperature != 1.0:  # dividing by 1 changes nothing
        logits = logits / temperature
    if top_k_active(top_k, logits.shape[-1]):
        kept = None if top_p_active(top_p) else kept_top_k(logits, top_k)
        if kept is not None:  # a softmax over the k kept logits: no pass over the masked vocabulary
            values, indices = kept
            return F.softmax(values, dim=-1), indices
        logits = logits.masked_fill(top_k_mask(logits, top_k), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p_active(top_p):
        probs = probs.masked_fill(top_p_mask(probs, top_p), 0.0)
    # The official nucleus pass also runs at p = 1, where it amounts to this renormalisation (plus
    # dropping tail tokens whose float cumulative sum already rounded to 1, ~1e-7 of mass): dividing
    # without the sort keeps the draws equal to the official ones at a fraction of the cost.
    return probs / probs.sum(dim=-1, keepdim=True), None


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """The distribution a token is drawn from over the whole vocabulary, (B, V) float32."""
    return full_probs(*sampling_distribution(logits, temperature, top_k, top_p), logits.shape[-1])


def sample_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logits` (B, V): (B,) int64, the one `torch.multinomial(sampling_probs(...), 1)` draws
    from `generator` (None: the global RNG), which it leaves in the same state (see common/multinomial.py)."""
    probs, indices = sampling_distribution(logits, temperature, top_k, top_p)
    return multinomial_draw(probs, indices, logits.shape[-1], generator)


def cfg_mix(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond_logits + scale * (cond_logits - uncond_logits)

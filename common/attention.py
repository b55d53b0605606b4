"""Multi-head self-attention through `F.scaled_dot_product_attention`: causal with a KV cache, or bidirectional.

Only the core: a model keeps its own projections (named as its official checkpoints name them)
and calls `causal_attention` or `bidirectional_attention` on heads it has split. The cache holds
the keys and values of every position seen so far in one buffer allocated at the first call, so
decoding one token at a time writes into it instead of growing tensors by concatenation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values (B, n_head, max_len, head_dim) of one attention layer; `length` positions are filled."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def reset(self) -> None:
        """Forget every position (the buffers are kept for the next sequence of the same batch)."""
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the keys and values of the new positions; return those of all positions so far."""
        if self.keys is None or self.keys.shape[0] != k.shape[0]:
            B, n_head, _, head_dim = k.shape
            self.keys = k.new_empty(B, n_head, self.max_len, head_dim)
            self.values = v.new_empty(B, n_head, self.max_len, head_dim)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache of {self.max_len} positions cannot take position {end - 1}")
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, n_head, T, C / n_head); head h owns channels h*hd .. (h+1)*hd - 1."""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, n_head, T, head_dim) -> (B, T, n_head * head_dim)."""
    B, n_head, T, head_dim = x.shape
    return x.transpose(1, 2).reshape(B, T, n_head * head_dim)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None = None,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of T new positions (q, k, v: (B, n_head, T, head_dim)) to themselves and, with a cache,
    to every cached position before them; each position sees only positions up to its own. Scale 1/sqrt(hd)."""
    past = 0
    if cache is not None:
        past = cache.length
        k, v = cache.append(k, v)
    T = q.shape[2]
    if T == 1:  # the newest position sees everything
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def bidirectional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
                            ) -> torch.Tensor:
    """Attention of every position to every position (q, k, v: (B, n_head, T, head_dim)), no mask; scale
    1/sqrt(hd). `dropout_p` drops attention probabilities (pass 0 outside training)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)

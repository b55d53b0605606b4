"""LlamaGen's class-conditional GPT, trained by next-patch prediction (Pang et al., 2024).

A Llama-style decoder over [class token] + image codes in raster order: pre-norm blocks of RMSNorm,
causal self-attention with 2-D rotary embeddings and a SwiGLU feed-forward, all bias-free.
Next-patch prediction trains it on coarser sequences first: the embeddings of each p x p block of
codes are averaged into one patch embedding, position n predicts every code of patch n, and the
rotary table is that of the coarse grid. At p = 1 this is LlamaGen's next-token training, and
sampling is always token by token (with a KV cache and classifier-free guidance). Module names
follow the official state dict (FoundationVision/LlamaGen `Transformer`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from common.attention import KVCache, causal_attention, merge_heads
from common.config import validate
from common.errors import ConfigError, DataError
from common.layers import RMSNorm, SamplingLinear, SwiGLU
from common.rope import apply_rope, rope_2d_table
from common.knobs import Knob, token_folder_name, token_knobs
from common.sampling import cfg_mix, check_sampling_knobs, sample_from_logits
from npp.schema import GPT_ARCH


class ClassEmbedding(nn.Module):
    """Class labels -> one token (B, 1, dim); row `num_classes` is the null class of guidance, and in
    training each label becomes the null class with probability `dropout_prob`."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            dropped = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(dropped, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)[:, None]


class Attention(nn.Module):
    """Causal multi-head self-attention with 2-D RoPE on queries and keys; one fused qkv projection."""

    def __init__(self, dim: int, n_head: int, resid_dropout: float):
        super().__init__()
        self.n_head = n_head
        self.wqkv = SamplingLinear(dim, 3 * dim, bias=False)
        self.wo = SamplingLinear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        q, k = apply_rope(qkv[:2], rope).unbind(0)  # queries and keys rotated in one pass (a sampling step is short)
        out = causal_attention(q, k, qkv[2], cache)
        return self.resid_dropout(self.wo(merge_heads(out)))


class Block(nn.Module):
    """x + attention(RMSNorm(x)), then + SwiGLU(RMSNorm(.))."""

    def __init__(self, dim: int, n_head: int, ffn_hidden: int, norm_eps: float, resid_dropout: float,
                 ffn_dropout: float):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(dim, n_head, resid_dropout)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = SwiGLU(dim, ffn_hidden, ffn_dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache)
        return h + self.feed_forward(self.ffn_norm(h))


def patch_targets(codes: torch.Tensor, grid: int, side: int) -> torch.Tensor:
    """Codes (B, grid^2) in raster order -> (B, N, side^2): patches in raster order over the coarse
    grid, the codes of each patch row by row."""
    B, coarse = codes.shape[0], grid // side
    blocks = codes.reshape(B, coarse, side, coarse, side).permute(0, 1, 3, 2, 4)
    return blocks.reshape(B, coarse * coarse, side * side)


def average_patches(embeddings: torch.Tensor, grid: int, side: int) -> torch.Tensor:
    """Token embeddings (B, grid^2, dim) -> the mean of each side x side block (B, (grid / side)^2, dim)."""
    if side == 1:
        return embeddings
    B, _, dim = embeddings.shape
    image = embeddings.transpose(1, 2).reshape(B, dim, grid, grid)
    return F.avg_pool2d(image, side).flatten(2).transpose(1, 2)


class GPT(nn.Module):
    """Class label -> codes (B, grid, grid) of a tokenizer, one at a time."""

    SAMPLING_KNOBS = {**token_knobs(per_depth=False),
                      "cfg_interval": Knob(int, -1, ("--cfg-interval",), valid=lambda n: n >= -1, rule=">= -1",
                                           doc="guide only the first N + 2 tokens (-1: all)")}

    def __init__(self, dim: int, n_layer: int, n_head: int, vocab_size: int = 16384, num_classes: int = 1000,
                 image_tokens: int = 256, ffn_hidden: int | None = None, multiple_of: int = 256,
                 rope_base: float = 10000.0, norm_eps: float = 1e-5, token_dropout_p: float = 0.1,
                 resid_dropout_p: float = 0.1, ffn_dropout_p: float = 0.1, class_dropout_prob: float = 0.1):
        super().__init__()
        ffn_hidden = ffn_hidden or multiple_of * math.ceil(int(8 * dim / 3) / multiple_of)
        self.cls_embedding = ClassEmbedding(num_classes, dim, class_dropout_prob)
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.tok_dropout = nn.Dropout(token_dropout_p)
        self.layers = nn.ModuleList(Block(dim, n_head, ffn_hidden, norm_eps, resid_dropout_p, ffn_dropout_p)
                                    for _ in range(n_layer))
        self.norm = RMSNorm(dim, norm_eps)
        self.output = SamplingLinear(dim, vocab_size, bias=False)
        self.grid = math.isqrt(image_tokens)
        self.head_dim = dim // n_head
        self.rope_base = rope_base
        self.num_classes = num_classes
        self.vocab_size = vocab_size
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """The class-table row of classifier-free guidance (every LlamaGen model has one)."""
        return self.num_classes

    @property
    def code_shape(self) -> tuple[int, int]:
        """(grid, grid): one image's codes as this prior models them."""
        return self.grid, self.grid

    @staticmethod
    def knob_folder_name(knobs: Mapping[str, Any]) -> str:
        interval = knobs["cfg_interval"]
        return token_folder_name(knobs) + (f"_cfg_interval_{interval}" if interval >= 0 else "")

    @classmethod
    def from_config(cls, arch: Mapping[str, Any], source: str = "config") -> "GPT":
        """Build from an `arch` section (see npp/schema.py)."""
        arch = validate(arch, GPT_ARCH, source, prefix="arch.")
        check_arch(arch, source)
        return cls(**{k: v for k, v in arch.items() if k != "type"})

    def repeated_blocks(self) -> list[nn.Module]:
        """The transformer blocks: one unit each of FSDP sharding and of activation checkpointing."""
        return list(self.layers)

    def initialize_weights(self) -> None:
        """LlamaGen's: every Linear and Embedding N(0, 0.02), the output layer zero."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    def rope(self, grid: int, device: torch.device) -> torch.Tensor:
        """The rotary table of a grid of this side (class token first)."""
        return rope_2d_table(grid, self.head_dim, self.rope_base).to(device)

    def transformer(self, x: torch.Tensor, rope: torch.Tensor, caches: list[KVCache] | None = None
                    ) -> torch.Tensor:
        """Sequence (B, T, dim) with its rotary rows (T, hd / 2, 2) -> float32 logits (B, T, V)."""
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, caches[i] if caches else None)
        return self.output(self.norm(x)).float()

    def forward(self, codes: torch.Tensor, labels: torch.Tensor, patch_side: int = 1) -> torch.Tensor:
        """Teacher-forced logits (B, N, V), N = (grid / patch_side)^2, for codes (B, grid, grid) or in raster
        order (B, grid^2): position n, fed the class token and patches 0 .. n-1, predicts patch n."""
        codes = codes.flatten(1)
        patches = average_patches(self.tok_embeddings(codes), self.grid, patch_side)
        x = self.tok_dropout(torch.cat([self.cls_embedding(labels), patches[:, :-1]], dim=1))
        return self.transformer(x, self.rope(self.grid // patch_side, x.device)[:x.shape[1]])

    def loss(self, codes: torch.Tensor, labels: torch.Tensor, patch_side: int = 1
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy of every code against the logits of its patch (LlamaGen's loss at patch_side 1)."""
        log_probs = F.log_softmax(self(codes, labels, patch_side), dim=-1)  # (B, N, V)
        targets = patch_targets(codes.flatten(1), self.grid, patch_side)  # (B, N, P)
        loss = -log_probs.gather(-1, targets).mean()
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, cfg_scale: float = 1.0, cfg_interval: int = -1,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, cached: bool = True) -> torch.Tensor:
        """Sample codes (B, grid, grid) for class labels (B,), token by token in raster order with a KV cache.

        With cfg_scale > 1 the labels and the null class run as one batch and the logits are
        uncond + cfg_scale * (cond - uncond), for every token, or with cfg_interval >= 0 for the
        first cfg_interval + 2 tokens only (then the conditional logits). One `torch.multinomial` draw
        per token for the whole batch, from `generator` or the global RNG (common/multinomial.py).
        `cached=False` runs the whole sequence through the model at every step instead (the slow reference).
        """
        check_sampling_knobs(temperature, top_k, top_p)
        self.check_labels(labels)
        guided = cfg_scale > 1.0
        cond = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
        steps = self.grid ** 2
        caches = [KVCache(1 + steps) for _ in self.layers] if cached else None
        rope = self.rope(self.grid, labels.device)
        codes = torch.empty(labels.shape[0], steps, dtype=torch.long, device=labels.device)
        x = sequence = self.cls_embedding(cond)  # the newest input; the whole sequence so far
        for t in range(steps):
            if cached:
                logits = self.transformer(x, rope[t:t + 1], caches)[:, -1]
            else:
                logits = self.transformer(sequence, rope[:t + 1])[:, -1]
            if guided:
                cond_logits, uncond_logits = logits.chunk(2)
                logits = cfg_mix(cond_logits, uncond_logits, cfg_scale) \
                    if cfg_interval < 0 or t <= cfg_interval + 1 else cond_logits
            codes[:, t] = sample_from_logits(logits, temperature, top_k, top_p, generator)
            x = self.tok_embeddings(codes[:, t:t + 1].repeat(len(cond) // len(labels), 1))
            if not cached:
                sequence = torch.cat([sequence, x], dim=1)
        return codes.view(-1, self.grid, self.grid)

    def check_labels(self, labels: torch.Tensor) -> None:
        if labels.ndim != 1 or labels.is_floating_point() or labels.min() < 0 or labels.max() > self.num_classes:
            raise DataError(f"class labels must be integers in [0, {self.num_classes}) ({self.num_classes}: the "
                            f"null class), shape (B,), got {labels.dtype} {tuple(labels.shape)}")

    def check_patch_side(self, patch_side: int, source: str = "") -> None:
        if patch_side < 1 or self.grid % patch_side:
            raise ConfigError(f"{source}patches of {patch_side ** 2} codes (side {patch_side}) do not tile the "
                              f"{self.grid}x{self.grid} code grid")

    def check_codes(self, codes: torch.Tensor) -> None:
        """Refuse codes of another grid or vocabulary (loaders call this once on cached codes)."""
        codes = codes.flatten(1)
        if (codes.shape[1] != self.grid ** 2 or codes.is_floating_point()
                or codes.min() < 0 or codes.max() >= self.vocab_size):
            raise DataError(f"codes must be integers in [0, {self.vocab_size}) of shape (B, {self.grid ** 2}), got "
                            f"{codes.dtype} {tuple(codes.shape)}")


def check_arch(arch: Mapping[str, Any], source: str) -> None:
    """Catch an inconsistent GPT arch section before it turns into a shape error inside the model."""
    for key in ("vocab_size", "image_tokens"):
        if arch[key] is None:
            raise ConfigError(f"{source}: arch.{key} is missing: set it to the tokenizer's (main_stage2.py fills it "
                              "from -v)")
    if arch["dim"] % arch["n_head"] or (arch["dim"] // arch["n_head"]) % 4:
        raise ConfigError(f"{source}: arch.dim {arch['dim']} must split into arch.n_head {arch['n_head']} heads "
                          "whose size is a multiple of 4 (2-D rotary embeddings)")
    if math.isqrt(arch["image_tokens"]) ** 2 != arch["image_tokens"]:
        raise ConfigError(f"{source}: arch.image_tokens must be a square grid of codes, got {arch['image_tokens']}")

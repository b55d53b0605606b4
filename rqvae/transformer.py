"""RQ-Transformer: the stage-2 prior over RQ-VAE codes (B, h, w, D).

A spatial transformer (`body_transformer`) reads the h*w positions in raster order, each
position entered as the sum of its D code vectors, and gives a context per position; a depth
transformer (`head_transformer`) then predicts the D codes of that position one after another
from the context and the partial sums of the codes already chosen. Code vectors come from the
RQ-VAE's shared codebook, held here as the buffer `codebook` so a trained prior samples codes
on its own. Parameter names follow the official state dict (kakaobrain/rq-vae-transformer).

The condition is a prefix of the body sequence: one token (a class label, or the start token of
unconditional models), or `block_size_cond` text tokens (text-to-image models: the caption's BPE
ids, pads included, no BOS/EOS). A text model also predicts its caption: `cond_classifier` reads
the body outputs of text tokens 0..L-2 and predicts tokens 1..L-1, and its cross-entropy joins the
image loss with the configured weights.

Classifier-free guidance is our addition: with `cfg_null_class` the class table gets one more
row, the null class, which replaces the class with probability `class_dropout` in training.
"""
from __future__ import annotations

from itertools import product
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.attention import KVCache, causal_attention, merge_heads, split_heads
from common.config import validate
from common.errors import CheckpointError, ConfigError, DataError
from common.knobs import token_folder_name, token_knobs
from common.layers import SamplingLinear
from common.sampling import KnobValue, cfg_mix, check_sampling_knobs, per_depth, sample_from_logits
from rqvae.schema import RQTRANSFORMER_ARCH


#################################################################################
#                        Transformer blocks (minGPT layout)                     #
#################################################################################

class SigmoidGELU(nn.Module):
    """The 'v2' GELU approximation x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with separate query/key/value Linears."""

    def __init__(self, embed_dim: int, n_head: int, bias: bool = True, attn_pdrop: float = 0.0,
                 resid_pdrop: float = 0.0):
        super().__init__()
        if embed_dim % n_head:
            raise ConfigError(f"embed_dim {embed_dim} must be a multiple of n_head {n_head}")
        self.key = SamplingLinear(embed_dim, embed_dim, bias=bias)
        self.query = SamplingLinear(embed_dim, embed_dim, bias=bias)
        self.value = SamplingLinear(embed_dim, embed_dim, bias=bias)
        self.proj = SamplingLinear(embed_dim, embed_dim, bias=bias)
        self.resid_drop = nn.Dropout(resid_pdrop)
        self.n_head = n_head
        self.attn_pdrop = attn_pdrop

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = (split_heads(linear(x), self.n_head) for linear in (self.query, self.key, self.value))
        y = causal_attention(q, k, v, cache, self.attn_pdrop if self.training else 0.0)  # (B, nh, T, hd)
        return self.resid_drop(self.proj(merge_heads(y)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, embed_dim: int, n_head: int, mlp_bias: bool = True, attn_bias: bool = True,
                 attn_pdrop: float = 0.0, resid_pdrop: float = 0.1, gelu: str = "v1"):
        super().__init__()
        self.ln1 = nn.LayerNorm(embed_dim)
        self.ln2 = nn.LayerNorm(embed_dim)
        self.attn = SelfAttention(embed_dim, n_head, attn_bias, attn_pdrop, resid_pdrop)
        self.mlp = nn.Sequential(
            SamplingLinear(embed_dim, 4 * embed_dim, bias=mlp_bias),
            nn.GELU() if gelu == "v1" else SigmoidGELU(),
            SamplingLinear(4 * embed_dim, embed_dim, bias=mlp_bias),
            nn.Dropout(resid_pdrop),
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """A causal stack of blocks; with caches (one per block) it takes only the new positions."""

    def __init__(self, n_layer: int, **block: Any):
        super().__init__()
        self.blocks = nn.ModuleList(Block(**block) for _ in range(n_layer))

    def new_caches(self, max_len: int) -> list[KVCache]:
        return [KVCache(max_len) for _ in self.blocks]

    def forward(self, x: torch.Tensor, caches: Sequence[KVCache] | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None)
        return x


#################################################################################
#                         Embeddings and output layers                          #
#################################################################################

class DepthEmbedding(nn.Embedding):
    """Separate token tables per depth, stored end to end in one weight (D * V, C) with row offsets
    (the official `TupleEmbedding` layout). Codes (..., D) -> (..., D, C)."""

    def __init__(self, vocab_size: int, depth: int, embed_dim: int):
        super().__init__(vocab_size * depth, embed_dim)
        self.register_buffer("offsets", torch.arange(depth) * vocab_size)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return super().forward(codes + self.offsets)


class DepthLinear(nn.Module):
    """One Linear per depth, weight (D, in, out) and bias (D, out) as in the official checkpoints."""

    def __init__(self, depth: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(depth, in_features, out_features) * 0.02)
        self.bias = nn.Parameter(torch.zeros(depth, out_features))

    def forward(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """x (..., D, in) -> (..., D, out), or x (..., in) -> (..., out) for the Linear of one `depth`."""
        if depth is None:
            return torch.einsum("...di,dio->...do", x, self.weight) + self.bias
        return x @ self.weight[depth] + self.bias[depth]


class Classifier(nn.Module):
    """LayerNorm, then logits over the codebook: one Linear for all depths, or one per depth."""

    def __init__(self, embed_dim: int, vocab_size: int, depth: int, shared: bool):
        super().__init__()
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.linear = SamplingLinear(embed_dim, vocab_size) if shared else DepthLinear(depth, embed_dim, vocab_size)

    def forward(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """x (..., D, C) -> (..., D, V); with `depth`, x (..., C) of that depth -> (..., V)."""
        x = self.layer_norm(x)
        if isinstance(self.linear, DepthLinear):
            return self.linear(x, depth)
        return self.linear(x)


#################################################################################
#                                 RQ-Transformer                                #
#################################################################################

class RQTransformer(nn.Module):
    """The prior interface every method shares: `forward(codes, cond)` -> logits (B, h, w, D, V),
    `loss(codes, cond, soft_targets)`, `generate(cond, **SAMPLING_KNOBS)` -> codes (B, h, w, D).

    `cond` is class labels (B,), or text token ids (B, context_length) for a text model, whose
    `text_tokenizer` (set by its loader) turns prompts into them."""

    SAMPLING_KNOBS = token_knobs(per_depth=True)
    knob_folder_name = staticmethod(token_folder_name)

    def __init__(self, vocab_size: int, block_size: Sequence[int], embed_dim: int, body: Mapping[str, Any],
                 head: Mapping[str, Any], input_embed_dim: int | None = None, vocab_size_cond: int = 1,
                 embd_pdrop: float = 0.0, input_emb_vqvae: bool = True, head_emb_vqvae: bool = True,
                 cumsum_depth_ctx: bool = True, shared_tok_emb: bool = True, shared_cls_emb: bool = True,
                 cfg_null_class: bool = False, class_dropout: float = 0.0, block_size_cond: int = 1):
        super().__init__()
        h, w, D = block_size
        self.block_size = (h, w, D)
        self.vocab_size = vocab_size
        self.cond_length = max(block_size_cond, 1)  # condition tokens in front of the image positions
        self.context_length = self.cond_length if self.cond_length > 1 else 0  # text tokens (0: no text)
        self.text_vocab_size = vocab_size_cond if self.context_length else 0
        self.text_tokenizer = None  # a TextTokenizer (common/text_tokenizer.py) of a text model, set by its loader
        self.num_classes = 1 if self.context_length else max(vocab_size_cond, 1)
        self.null_class = self.num_classes if cfg_null_class else None
        self.class_dropout = class_dropout
        self.cumsum_depth_ctx = cumsum_depth_ctx

        # vocab_size_cond == 1: the single row is a learned start token of unconditional models;
        # a text model has one row per text token
        self.cond_emb = nn.Embedding(max(vocab_size_cond, 1) + int(cfg_null_class), embed_dim)
        self.pos_emb_cond = nn.Parameter(torch.randn(1, self.cond_length, embed_dim) * 0.02)
        self.pos_emb_hw = nn.Parameter(torch.randn(1, h * w, embed_dim) * 0.02)
        self.pos_emb_d = nn.Parameter(torch.randn(1, D, embed_dim) * 0.02)
        self.input_mlp = nn.Linear(input_embed_dim, embed_dim) if input_emb_vqvae else None
        self.head_mlp = nn.Linear(input_embed_dim, embed_dim) if head_emb_vqvae else None
        if not (input_emb_vqvae and head_emb_vqvae):
            self.tok_emb = (nn.Embedding(vocab_size, embed_dim) if shared_tok_emb
                            else DepthEmbedding(vocab_size, D, embed_dim))
        if input_emb_vqvae or head_emb_vqvae:
            # filled from the RQ-VAE (set_codebook_from); saved with the weights, never trained
            self.register_buffer("codebook", torch.zeros(vocab_size, input_embed_dim))
        self.embed_drop = nn.Dropout(embd_pdrop)

        self.body_transformer = Transformer(body["n_layer"], embed_dim=embed_dim, **_block_args(body))
        self.head_transformer = Transformer(head["n_layer"], embed_dim=embed_dim, **_block_args(head))
        self.classifier = Classifier(embed_dim, vocab_size, D, shared_cls_emb)
        if self.context_length:
            self.cond_classifier = Classifier(embed_dim, vocab_size_cond, 1, shared=True)  # next text token

    def repeated_blocks(self) -> list[nn.Module]:
        """The blocks of both transformers: one unit each of FSDP sharding and of activation checkpointing."""
        return [*self.body_transformer.blocks, *self.head_transformer.blocks]

    @property
    def code_depth(self) -> int:
        """Codes per position (D): the sampling knobs take one value or one per depth."""
        return self.block_size[2]

    @property
    def code_shape(self) -> tuple[int, int, int]:
        """(h, w, D) of one image's codes as this prior models them."""
        return self.block_size

    @classmethod
    def from_config(cls, arch: Mapping[str, Any], source: str = "config") -> "RQTransformer":
        """Build from an `arch` section (ours or an official config.yaml); the codebook is set afterwards."""
        arch = validate(arch, RQTRANSFORMER_ARCH, source, prefix="arch.")
        check_arch(arch, source)
        vocab_size = arch.vocab_size if isinstance(arch.vocab_size, int) else arch.vocab_size[0]
        return cls(vocab_size, arch.block_size, arch.embed_dim, arch.body, arch.head, arch.input_embed_dim,
                   arch.vocab_size_cond, arch.embd_pdrop, arch.input_emb_vqvae, arch.head_emb_vqvae,
                   arch.cumsum_depth_ctx, arch.shared_tok_emb, arch.shared_cls_emb, arch.cfg_null_class,
                   arch.class_dropout, arch.block_size_cond)

    @torch.no_grad()
    def set_codebook_from(self, rqvae: nn.Module, source: str = "the RQ-VAE") -> None:
        """Copy the shared codebook of the RQ-VAE whose codes this prior models; a mismatch is a CheckpointError."""
        if not hasattr(self, "codebook"):
            return
        quantizer = rqvae.quantizer
        found = (quantizer.n_embed, quantizer.codebooks[0].dim, tuple(quantizer.code_shape))
        wanted = (self.vocab_size, self.codebook.shape[1], self.block_size)
        if not quantizer.shared_codebook or found != wanted:
            raise CheckpointError(
                f"{source}: the RQ-Transformer needs an RQ-VAE with a shared codebook of {wanted[0]} codes of "
                f"dimension {wanted[1]} and code shape {list(wanted[2])}, got {found[0]} codes of dimension "
                f"{found[1]}, code shape {list(found[2])}, shared_codebook {quantizer.shared_codebook}; "
                "use the stage-1 checkpoint the prior was trained with")
        self.codebook.copy_(quantizer.codebooks[0].weight[:-1])  # the last row is the unused padding row

    # -- inputs -----------------------------------------------------------------------------------

    def check_codes(self, codes: torch.Tensor) -> None:
        """Refuse codes of another shape or vocabulary (loaders call this once on cached codes)."""
        if codes.is_floating_point() or tuple(codes.shape[1:]) != self.block_size:
            raise DataError(f"codes must be an integer tensor (B, {', '.join(map(str, self.block_size))}), "
                            f"got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.vocab_size):
            raise DataError(f"codes must lie in [0, {self.vocab_size}), got values in "
                            f"[{int(codes.min())}, {int(codes.max())}]: codes of another tokenizer?")

    def check_cond(self, cond: torch.Tensor, batch: int) -> None:
        """Class labels (B,) in [0, num_classes] (the last one only if it is the null class), or for a text
        model text token ids (B, context_length) in [0, text_vocab_size)."""
        text = self.context_length > 0
        shape, what = ((batch, self.context_length), "text token ids") if text else ((batch,), "class labels")
        if cond.is_floating_point() or tuple(cond.shape) != shape:
            hint = ("; a text-conditioned prior samples from prompts (scripts/sample.py --prompt, "
                    "main_sampling_txt2img.py)") if text else ""
            raise DataError(f"cond must be integer {what} of shape {shape}, got {cond.dtype} "
                            f"{tuple(cond.shape)}{hint}")
        rows = self.cond_emb.num_embeddings
        if cond.numel() and (cond.min() < 0 or cond.max() >= rows):
            raise DataError(f"{what} must lie in [0, {rows}) for this prior, got values in "
                            f"[{int(cond.min())}, {int(cond.max())}]")

    def cond_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """Class labels (B,) or text ids (B, L) -> the first body tokens (B, cond_length, C); in training some
        labels become the null class."""
        if self.training and self.class_dropout > 0:
            dropped = torch.rand(cond.shape, device=cond.device) < self.class_dropout
            cond = torch.where(dropped, self.null_class, cond)
        return self.cond_emb(cond.reshape(cond.shape[0], -1)) + self.pos_emb_cond

    def spatial_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, N, D) -> body inputs (B, N, C), no positions: the D code embeddings summed.

        input_mlp is applied per depth and then summed (its bias counts D times), as officially."""
        if self.input_mlp is None:
            return self.tok_emb(codes).sum(-2)
        return self.input_mlp(F.embedding(codes, self.codebook)).sum(-2)

    def depth_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, N, D) -> (B, N, D, C); entry d is the input of depth slot d + 1 (codes 0..d known)."""
        if self.head_mlp is None:
            return self.tok_emb(codes)
        vectors = F.embedding(codes, self.codebook)  # (B, N, D, dim)
        if self.cumsum_depth_ctx:
            vectors = vectors.cumsum(-2)  # the quantized feature after the first d + 1 codes
        return self.head_mlp(vectors)

    # -- teacher forcing --------------------------------------------------------------------------

    def empty_cond(self, batch: int, device: torch.device) -> torch.Tensor:
        """What no condition means: class 0 (the start token of unconditional models), or the empty caption
        (all [PAD]) of a text model, as officially."""
        return torch.zeros(batch, *((self.context_length,) if self.context_length else ()), dtype=torch.long,
                           device=device)

    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (B, h, w, D) and conditions -> logits (B, h, w, D, V) of every code given the ones before."""
        return self.teacher_forcing(codes, cond)[0]

    def teacher_forcing(self, codes: torch.Tensor, cond: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image logits (B, h, w, D, V) and, for a text model, text logits (B, L - 1, text vocabulary) whose row j
        predicts text token j + 1; no cond: `empty_cond`."""
        B, h, w, D = codes.shape
        if cond is None:
            cond = self.empty_cond(B, codes.device)
        codes = codes.reshape(B, h * w, D)

        x = self.spatial_inputs(codes) + self.pos_emb_hw  # (B, T, C)
        x = torch.cat([self.cond_tokens(cond), x[:, :-1]], dim=1)  # shifted: output t has seen positions < t
        out = self.body_transformer(self.embed_drop(x))  # (B, Lc + T - 1, C)
        spatial_ctx = out[:, self.cond_length - 1:]  # (B, T, C): the last condition token predicts position 0

        depth_ctx = torch.cat([spatial_ctx[:, :, None], self.depth_inputs(codes)[:, :, :-1]], dim=2)
        depth_ctx = depth_ctx + self.pos_emb_d  # (B, T, D, C)
        head_out = self.head_transformer(depth_ctx.reshape(B * h * w, D, -1))  # (B*T, D, C)
        logits = self.classifier(head_out).reshape(B, h, w, D, -1)
        text_logits = self.cond_classifier(out[:, :self.cond_length - 1]) if self.context_length else None
        return logits, text_logits

    def loss(self, codes: torch.Tensor, cond: torch.Tensor | None = None, soft_targets: torch.Tensor | None = None,
             img_weight: float = 0.9, txt_weight: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy of every code, against `codes` or against `soft_targets` (B, h, w, D, V)
        (the RQ-VAE's soft codes); logs hold the loss of each depth (`loss_d0`, ...).

        A text model's loss is img_weight * that + txt_weight * the mean cross-entropy of its caption's
        tokens 1..L-1, pads included (logged as `loss_img` and `loss_txt`); the weights serve text models only."""
        if cond is None:
            cond = self.empty_cond(codes.shape[0], codes.device)
        logits, text_logits = self.teacher_forcing(codes, cond)
        if soft_targets is None:
            per_code = F.cross_entropy(logits.flatten(0, -2), codes.flatten(), reduction="none")
        else:
            per_code = soft_target_cross_entropy(logits, soft_targets).flatten()
        loss = per_code.mean()
        per_depth_loss = per_code.detach().reshape(-1, self.block_size[2]).mean(0)
        logs = {"loss": loss.detach(), **{f"loss_d{d}": v for d, v in enumerate(per_depth_loss)}}
        if text_logits is None:
            return loss, logs
        text_loss = F.cross_entropy(text_logits.flatten(0, 1), cond[:, 1:].flatten())
        logs.update(loss_img=loss.detach(), loss_txt=text_loss.detach())
        loss = img_weight * loss + txt_weight * text_loss
        logs["loss"] = loss.detach()
        return loss, logs

    # -- sampling ---------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, cond: torch.Tensor, temperature: float = 1.0, top_k: KnobValue = None, top_p: KnobValue = None,
                 cfg_scale: float = 1.0, cached: bool = True, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """Sample codes (B, h, w, D) for class labels `cond` (B,) (zeros for unconditional priors), or for text
        token ids (B, context_length) of a text model.

        Raster order over positions, depth innermost; top_k / top_p are one value or one per depth.
        With cfg_scale != 1 the conditional and null-class halves run as one batch and their logits are
        mixed. One `torch.multinomial` per step on the whole batch, from `generator` or the global RNG.
        """
        h, w, D = self.block_size
        check_sampling_knobs(temperature, top_k, top_p)
        top_ks, top_ps = per_depth(top_k, D, "--top-k"), per_depth(top_p, D, "--top-p")
        if not isinstance(cond, torch.Tensor) or cond.ndim == 0:
            raise DataError("generate needs class labels cond of shape (B,) (zeros for an unconditional prior), or the "
                            "text token ids (B, context_length) of a text prior")
        self.check_cond(cond, cond.shape[0])
        guided = cfg_scale != 1.0  # at 1 the null half is skipped: exactly the unguided sampler
        if guided and self.null_class is None:
            raise ConfigError(f"--cfg-scale {cfg_scale} needs a prior trained for classifier-free guidance "
                              "(arch.cfg_null_class: true); use --cfg-scale 1 with this one")
        model_cond = torch.cat([cond, torch.full_like(cond, self.null_class)]) if guided else cond

        codes = torch.zeros(cond.shape[0], h, w, D, dtype=torch.long, device=cond.device)
        steps = self.cached_step_logits(codes, model_cond) if cached else self.step_logits(codes, model_cond)
        for (t, d), logits in zip(product(range(h * w), range(D)), steps):
            if guided:
                logits = cfg_mix(*logits.chunk(2), cfg_scale)
            codes[:, t // w, t % w, d] = sample_from_logits(logits, temperature, top_ks[d], top_ps[d], generator)
        return codes

    def step_logits(self, codes: torch.Tensor, cond: torch.Tensor) -> Iterator[torch.Tensor]:
        """Logits (len(cond), V) of each (position, depth) in generation order by full forward passes
        (the slow reference). `codes` is read as the caller fills it in; cond may repeat the batch."""
        h, w, D = self.block_size
        repeats = cond.shape[0] // codes.shape[0]
        for t, d in product(range(h * w), range(D)):
            yield self(codes.repeat(repeats, 1, 1, 1), cond)[:, t // w, t % w, d]

    def cached_step_logits(self, codes: torch.Tensor, cond: torch.Tensor) -> Iterator[torch.Tensor]:
        """As `step_logits`, with KV caches: the body takes one new position per step, the depth
        transformer one new slot per depth, its cache emptied at every position."""
        h, w, D = self.block_size
        repeats = cond.shape[0] // codes.shape[0]
        chosen = codes.view(codes.shape[0], h * w, D)
        body_caches = self.body_transformer.new_caches(self.cond_length + h * w - 1)
        head_caches = self.head_transformer.new_caches(D)

        x = self.cond_tokens(cond)  # (n, Lc, C): the body's first inputs
        for t in range(h * w):
            if t > 0:
                previous = chosen[:, t - 1:t].repeat(repeats, 1, 1)  # (n, 1, D)
                x = self.spatial_inputs(previous) + self.pos_emb_hw[:, t - 1:t]
            spatial_ctx = self.body_transformer(self.embed_drop(x), body_caches)[:, -1:]  # (n, 1, C)
            for cache in head_caches:
                cache.reset()
            for d in range(D):
                if d == 0:
                    slot = spatial_ctx
                else:
                    current = chosen[:, t:t + 1].repeat(repeats, 1, 1)  # (n, 1, D), codes < d filled
                    slot = self.depth_inputs(current)[:, :, d - 1]
                out = self.head_transformer(slot + self.pos_emb_d[:, d:d + 1], head_caches)  # (n, 1, C)
                yield self.classifier(out[:, 0], depth=d)


def _block_args(stack: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stack["block"].items() if k != "embed_dim"}


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-sum_k p_k log q_k per code (no reduction), with the official log-softmax that adds 1e-7 inside the log."""
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    log_q = shifted - torch.log(shifted.exp().sum(dim=-1, keepdim=True) + 1e-7)
    return -(targets * log_q).sum(-1)


def check_arch(arch: Mapping[str, Any], source: str) -> None:
    """Refuse arch sections this implementation cannot build, before they turn into shape errors."""
    block_size, vocab_size = arch["block_size"], arch["vocab_size"]
    if len(block_size) != 3:
        raise ConfigError(f"{source}: arch.block_size must be [h, w, D], got {block_size}")
    if vocab_size is None:
        raise ConfigError(f"{source}: arch.vocab_size is missing: set it to the RQ-VAE's n_embed")
    if isinstance(vocab_size, list) and (len(vocab_size) not in (1, block_size[2]) or len(set(vocab_size)) != 1):
        raise ConfigError(f"{source}: arch.vocab_size must be one codebook size (the codebook is shared by the "
                          f"depths), got {vocab_size}")
    text = arch["block_size_cond"] > 1
    if text and arch["vocab_size_cond"] < 2:
        raise ConfigError(f"{source}: arch.block_size_cond {arch['block_size_cond']} makes a text model, whose "
                          f"arch.vocab_size_cond must be the text vocabulary size, got {arch['vocab_size_cond']}")
    if (arch["input_emb_vqvae"] or arch["head_emb_vqvae"]) and arch["input_embed_dim"] is None:
        raise ConfigError(f"{source}: arch.input_embed_dim (the RQ-VAE codebook dimension) is required "
                          "with input_emb_vqvae or head_emb_vqvae")
    for stack in ("body", "head"):
        width = arch[stack]["block"]["embed_dim"]
        if width is not None and width != arch["embed_dim"]:
            raise ConfigError(f"{source}: arch.{stack}.block.embed_dim {width} must equal arch.embed_dim "
                              f"{arch['embed_dim']}")
    if arch["cfg_null_class"] and (arch["vocab_size_cond"] <= 1 or text):
        raise ConfigError(f"{source}: arch.cfg_null_class needs a class-conditional prior (vocab_size_cond > 1)")
    if not 0 <= arch["class_dropout"] <= 1 or (arch["class_dropout"] > 0 and not arch["cfg_null_class"]):
        raise ConfigError(f"{source}: arch.class_dropout must be in [0, 1] and needs arch.cfg_null_class: true, "
                          f"got {arch['class_dropout']}")

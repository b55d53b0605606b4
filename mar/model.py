"""MAR: masked autoregressive generation of continuous latent tokens (Li et al., 2024).

The latents (B, C, H, W) of a KL VAE are cut into L tokens. A bidirectional MAE-style encoder reads
the known tokens after `buffer_size` copies of the class embedding; a decoder puts mask tokens at
the unknown positions and gives one vector z per position; DiffLoss models each unknown token given
its z with a small diffusion model. Training masks a random 70-100% of the tokens in a random order;
generation starts from everything masked and reveals tokens in a random order over `num_iter`
steps on a cosine schedule, sampling each step's tokens with DiffLoss (classifier-free guidance on
the predicted noise, temperature on the diffusion noise). Module and parameter names follow the
released state dicts (LTH14/mar).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping

import numpy as np
import scipy.stats
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.config import validate
from common.errors import ConfigError, DataError
from common.knobs import Knob
from common.vit import Block, gather_positions
from mar.diffloss import DiffLoss
from mar.schema import MAR_ARCH


class MAR(nn.Module):
    """Class labels -> latents (B, vae_embed_dim, img_size / vae_stride, img_size / vae_stride)."""

    SAMPLING_KNOBS = {
        "num_iter": Knob(int, 64, ("--num-iter",), valid=lambda n: n >= 1, rule=">= 1",
                         doc="autoregressive steps (the released models were scored with 256)"),
        "num_sampling_steps": Knob(str, None, ("--num-sampling-steps",), optional=True,
                                   doc="DiffLoss diffusion steps, e.g. '100' or 'ddim50' (default: the model's)"),
        "cfg": Knob(float, 1.0, ("--cfg", "--cfg-scale"), doc="classifier-free guidance scale (1: off)"),
        "cfg_schedule": Knob(str, "linear", ("--cfg-schedule",), choices=("linear", "constant"),
                             doc="guidance rising with the share of generated tokens, or constant"),
        "temperature": Knob(float, 1.0, ("-t", "--temp"), valid=lambda t: t >= 0, rule=">= 0",
                            doc="scales the noise of every diffusion step"),
    }

    def __init__(self, img_size: int = 256, vae_stride: int = 16, patch_size: int = 1,
                 encoder_embed_dim: int = 1024, encoder_depth: int = 16, encoder_num_heads: int = 16,
                 decoder_embed_dim: int = 1024, decoder_depth: int = 16, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_eps: float = 1e-5, vae_embed_dim: int = 16,
                 mask_ratio_min: float = 0.7, label_drop_prob: float = 0.1, class_num: int = 1000,
                 attn_dropout: float = 0.1, proj_dropout: float = 0.1, buffer_size: int = 64,
                 diffloss_d: int = 3, diffloss_w: int = 1024, num_sampling_steps: str | int = "100",
                 diffusion_batch_mul: int = 4, grad_checkpointing: bool = False, noise_schedule: str = "cosine"):
        super().__init__()
        self.vae_embed_dim = vae_embed_dim
        self.patch_size = patch_size
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size ** 2
        self.num_classes = class_num
        self.label_drop_prob = label_drop_prob
        self.buffer_size = buffer_size
        self.diffusion_batch_mul = diffusion_batch_mul
        self.grad_checkpointing = grad_checkpointing
        # one mask ratio per batch: a normal around 1 (std 0.25) cut to [mask_ratio_min, 1]
        self.mask_ratio_generator = scipy.stats.truncnorm((mask_ratio_min - 1.0) / 0.25, 0, loc=1.0, scale=0.25)

        # the five bare parameters come first in the state dict, in this order
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))  # the "no class" embedding
        positions = buffer_size + self.seq_len
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, positions, encoder_embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, positions, decoder_embed_dim))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))

        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.encoder_blocks = nn.ModuleList(
            Block(encoder_embed_dim, encoder_num_heads, mlp_ratio, qkv_bias=True, norm_eps=norm_eps,
                  attn_drop=attn_dropout, proj_drop=proj_dropout) for _ in range(encoder_depth))
        self.encoder_norm = nn.LayerNorm(encoder_embed_dim, eps=norm_eps)
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_eps=norm_eps,
                  attn_drop=attn_dropout, proj_drop=proj_dropout) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=norm_eps)
        self.initialize_weights()
        self.diffloss = DiffLoss(self.token_embed_dim, decoder_embed_dim, diffloss_d, diffloss_w,
                                 num_sampling_steps, grad_checkpointing, noise_schedule)

    @classmethod
    def from_config(cls, arch: Mapping[str, Any], source: str = "config") -> "MAR":
        """Build from an `arch` section (see mar/schema.py): the named model's settings, then every field set."""
        arch = validate(arch, MAR_ARCH, source, prefix="arch.")
        given = {k: v for k, v in arch.items() if k not in ("type", "model") and v is not None}
        defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
        settings = {**defaults, **MAR_SETTINGS.get(arch["model"], {}), **given}
        check_arch(settings, source)
        return cls(**settings)

    def repeated_blocks(self) -> list[nn.Module]:
        """The encoder's and decoder's transformer blocks: one unit each of FSDP sharding and of activation
        checkpointing (the DiffLoss MLP stays with the rest)."""
        return [*self.encoder_blocks, *self.decoder_blocks]

    def initialize_weights(self) -> None:
        """N(0, 0.02) embeddings and mask token, Xavier-uniform Linears with zero bias, unit LayerNorms
        (DiffLoss initialises itself)."""
        for param in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                      self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def num_sampling_steps(self) -> str:
        return self.diffloss.num_sampling_steps

    def knob_folder_name(self, knobs: Mapping[str, Any]) -> str:
        """`ariter<n>-diffsteps<k>-temp<t>-<schedule>cfg<s>`, the official result-folder naming."""
        steps = knobs["num_sampling_steps"] or self.num_sampling_steps
        return (f"ariter{knobs['num_iter']}-diffsteps{steps}-temp{knobs['temperature']}-"
                f"{knobs['cfg_schedule']}cfg{knobs['cfg']}")

    # ------------------------------------------------------------------------------------------
    # Tokens
    # ------------------------------------------------------------------------------------------

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, c, H, W) -> (B, L, c p p): tokens in row-major order, channels ordered (c, dy, dx)."""
        B, c, H, W = latents.shape
        p = self.patch_size
        x = latents.reshape(B, c, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, c, p, p)
        return x.reshape(B, (H // p) * (W // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, c p p) -> (B, c, h p, w p), the inverse of patchify."""
        B, p, c = tokens.shape[0], self.patch_size, self.vae_embed_dim
        x = tokens.reshape(B, self.seq_h, self.seq_w, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, c, h, p, w, p)
        return x.reshape(B, c, self.seq_h * p, self.seq_w * p)

    def sample_orders(self, batch: int, device: torch.device, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
        """One random permutation of the L positions per sample (B, L): from numpy's global generator, one
        shuffle per sample as the reference code draws them, or from `generator`."""
        if generator is None:
            orders = []
            for _ in range(batch):
                order = np.arange(self.seq_len)
                np.random.shuffle(order)
                orders.append(order)
            return torch.from_numpy(np.stack(orders)).to(device, non_blocking=True)
        keys = torch.rand(batch, self.seq_len, generator=generator, device=generator.device)
        return keys.argsort(dim=1).to(device)

    def with_buffer(self, visible: torch.Tensor) -> torch.Tensor:
        """Positions (B, V) among the L tokens -> (B, buffer + V) among the buffer + L slots, buffer first."""
        buffer = torch.arange(self.buffer_size, device=visible.device).expand(visible.shape[0], -1)
        return torch.cat([buffer, visible + self.buffer_size], dim=1)

    # ------------------------------------------------------------------------------------------
    # Encoder and decoder
    # ------------------------------------------------------------------------------------------

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) through `blocks`; with `keep` (B, Q) the last block gives only those positions (B, Q, D)."""
        if keep is not None and not len(blocks):
            return gather_positions(x, keep)
        for i, block in enumerate(blocks):
            last = keep if i == len(blocks) - 1 else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, last, use_reentrant=False)
            else:
                x = block(x, last)
        return x

    def encode(self, tokens: torch.Tensor, visible: torch.Tensor, class_embedding: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, C) of which the positions `visible` (B, V, ascending) are known, and one class
        embedding per sample (B, D_enc) -> (B, buffer + V, D_enc): the buffer slots, then the known tokens."""
        C = tokens.shape[-1]
        x = self.z_proj(tokens.gather(1, visible[..., None].expand(-1, -1, C)))  # (B, V, D_enc)
        buffer = class_embedding[:, None].to(x.dtype).expand(-1, self.buffer_size, -1)
        x = torch.cat([buffer, x], dim=1)  # (B, buffer + V, D_enc)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned[0, self.with_buffer(visible)])
        return self.encoder_norm(self.run_blocks(self.encoder_blocks, x))

    def decode(self, x: torch.Tensor, visible: torch.Tensor, predict: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, buffer + V, D_enc) -> z (B, L, D_dec): the DiffLoss condition of every position,
        or with `predict` (B, k) only of those positions (B, k, D_dec), which spares the last block the rest."""
        x = self.decoder_embed(x)  # (B, buffer + V, D_dec)
        B, D = x.shape[0], x.shape[-1]
        slots = self.mask_token.to(x.dtype).expand(B, self.buffer_size + self.seq_len, D)
        x = slots.scatter(1, self.with_buffer(visible)[..., None].expand(-1, -1, D), x)  # (B, buffer + L, D_dec)
        keep = None if predict is None else predict + self.buffer_size
        x = self.decoder_norm(self.run_blocks(self.decoder_blocks, x + self.decoder_pos_embed_learned, keep))
        if predict is None:
            return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned  # (B, L, D_dec)
        return x + self.diffusion_pos_embed_learned[0, predict]  # (B, k, D_dec)

    def conditions(self, tokens: torch.Tensor, visible: torch.Tensor, class_embedding: torch.Tensor,
                   predict: torch.Tensor | None = None) -> torch.Tensor:
        """z (B', L, D_dec) of tokens (B, L, C) known at `visible` (B, V), for each of B' = B or 2B class
        embeddings (B', D_enc): with 2B, the tokens serve both halves. With `predict` (B, k), only the z of
        those positions (B', k, D_dec)."""
        repeat = class_embedding.shape[0] // tokens.shape[0]
        tokens, visible = tokens.repeat(repeat, 1, 1), visible.repeat(repeat, 1)
        predict = None if predict is None else predict.repeat(repeat, 1)
        return self.decode(self.encode(tokens, visible, class_embedding), visible, predict)

    def class_embedding(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, D_enc): the labels' rows of the class table, or `fake_latent` for every sample without labels."""
        if labels is None:
            return self.fake_latent.expand(batch, -1)
        return self.class_emb(labels)

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """DiffLoss of the masked tokens of latents (B, C, h, w) given the visible ones and class labels (B,).

        Random draws, in the reference code's order: the orders and the mask ratio from numpy's global
        generator, the label drop (training only) from torch's CPU generator, DiffLoss's steps and noise
        from the device's generator.
        """
        expected = (self.vae_embed_dim, self.seq_h * self.patch_size, self.seq_w * self.patch_size)
        if tokens.ndim != 4 or tuple(tokens.shape[1:]) != expected:
            raise DataError(f"MAR takes latents of shape (B, {', '.join(map(str, expected))}), got "
                            f"{tuple(tokens.shape)}")
        x = self.patchify(tokens)  # (B, L, C)
        B, L, C = x.shape
        orders = self.sample_orders(B, x.device)
        num_masked = int(np.ceil(L * self.mask_ratio_generator.rvs(1)[0]))
        visible = orders[:, num_masked:].sort(dim=1).values  # (B, L - num_masked)
        mask = torch.zeros(B, L, device=x.device).scatter(1, orders[:, :num_masked], 1.0)  # 1 = to predict
        class_embedding = self.class_emb(labels)
        if self.training:  # label dropout: the class becomes fake_latent
            dropped = (torch.rand(B) < self.label_drop_prob).to(x.device, non_blocking=True)
            class_embedding = torch.where(dropped[:, None], self.fake_latent, class_embedding)
        z = self.decode(self.encode(x, visible, class_embedding), visible)  # (B, L, D_dec)
        # every token diffusion_batch_mul times (whole-batch repeats), each with its own step and noise
        mul = self.diffusion_batch_mul
        loss = self.diffloss(x.detach().reshape(B * L, C).repeat(mul, 1), z.reshape(B * L, -1).repeat(mul, 1),
                             mask.reshape(B * L).repeat(mul))
        return loss, {"loss": loss.detach()}

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def masked_after(self, step: int, num_iter: int, masked: int) -> int:
        """How many tokens stay masked after step `step`: L cos(pi/2 (step + 1) / num_iter) rounded down, but
        at least one token revealed per step and at least one left for the last step."""
        target = int(np.floor(self.seq_len * np.cos(math.pi / 2. * (step + 1) / num_iter)))
        return max(1, min(masked - 1, target))

    def guidance_scale(self, cfg: float, cfg_schedule: str, masked_after: int) -> float:
        """The guidance of a step: cfg, or with the linear schedule 1 + (cfg - 1) * (share of tokens known
        after the step), in float32 as the reference code computes it."""
        if cfg_schedule == "constant":
            return cfg
        known = torch.tensor(float(self.seq_len - masked_after), dtype=torch.float32)
        return float(1 + (cfg - 1) * known / self.seq_len)

    @torch.no_grad()
    def generate(self, labels: torch.Tensor | None, generator: torch.Generator | None = None, num_iter: int = 64,
                 num_sampling_steps: str | int | None = None, cfg: float = 1.0, cfg_schedule: str = "linear",
                 temperature: float = 1.0, batch_size: int | None = None) -> torch.Tensor:
        """Sample latents (B, C, h, w) for class labels (B,), or `batch_size` unconditional ones (labels None).

        Step s reveals the positions orders[b, masked_after(s) : masked] of each sample's random order (all
        remaining ones at the last step), with DiffLoss conditioned on the decoder's z there. With cfg != 1
        the labels and fake_latent run as one batch. generator=None draws as the reference code does (orders
        from numpy's global generator, noise from torch's), so seeded runs reproduce it; a torch.Generator
        makes the samples depend on it alone. The schedule is known in advance, so no step waits for the
        device.
        """
        B, device = self.check_generate(labels, batch_size, num_iter, num_sampling_steps, cfg_schedule)
        L, C = self.seq_len, self.token_embed_dim
        orders = self.sample_orders(B, device, generator)
        tokens = torch.zeros(B, L, C, device=device)
        class_embedding = self.class_embedding(labels, B)
        if cfg != 1.0:  # [cond; uncond] rows through the transformer and DiffLoss
            class_embedding = torch.cat([class_embedding, self.fake_latent.expand(B, -1)])
        masked = L  # positions orders[:, :masked] are still unknown
        for step in range(num_iter):
            visible = orders[:, masked:].sort(dim=1).values  # (B, L - masked)
            left = self.masked_after(step, num_iter, masked)
            start = 0 if step == num_iter - 1 else left  # the last step takes every token still masked
            predict = orders[:, start:masked].sort(dim=1).values  # (B, k), ascending as the reference gathers
            scale = self.guidance_scale(cfg, cfg_schedule, left)
            masked = left
            k = predict.shape[1]
            if k == 0:  # more steps than tokens: nothing left for this one
                continue
            z = self.conditions(tokens, visible, class_embedding, predict).flatten(0, 1)  # (B k or 2 B k, D_dec)
            sampled = self.diffloss.sample(z, temperature, scale, num_sampling_steps, generator)[:B * k]
            tokens = tokens.scatter(1, predict[..., None].expand(-1, -1, C), sampled.view(B, k, C))
        return self.unpatchify(tokens)

    def check_generate(self, labels: torch.Tensor | None, batch_size: int | None, num_iter: int,
                       num_sampling_steps: str | int | None, cfg_schedule: str) -> tuple[int, torch.device]:
        """Refuse labels or knobs the model cannot take, with one clear line; the batch size and device."""
        if num_iter < 1:
            raise ConfigError(f"num_iter must be >= 1, got {num_iter}")
        if cfg_schedule not in ("linear", "constant"):
            raise ConfigError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        self.diffloss.gen_diffusion(num_sampling_steps)  # a bad step spec fails here, not mid-way
        if labels is None:
            if not batch_size or batch_size < 1:
                raise DataError("generate without labels (unconditional) needs batch_size >= 1")
            return batch_size, self.fake_latent.device
        if labels.ndim != 1 or labels.is_floating_point() or labels.numel() == 0 or labels.min() < 0 \
                or labels.max() >= self.num_classes:
            raise DataError(f"class labels must be integers in [0, {self.num_classes}) of shape (B,), got "
                            f"{labels.dtype} {tuple(labels.shape)}")
        return labels.shape[0], labels.device


# ----------------------------------------------------------------------------------------------
# Named models: the released ones (head size 64, 80 for MAR-H), with their released DiffLoss sizes
# ----------------------------------------------------------------------------------------------

def _released(width: int, depth: int, heads: int, diffloss_d: int, diffloss_w: int) -> dict[str, Any]:
    return {"encoder_embed_dim": width, "encoder_depth": depth, "encoder_num_heads": heads,
            "decoder_embed_dim": width, "decoder_depth": depth, "decoder_num_heads": heads, "norm_eps": 1e-6,
            "diffloss_d": diffloss_d, "diffloss_w": diffloss_w}


MAR_SETTINGS: dict[str, dict[str, Any]] = {
    "mar_base": _released(768, 12, 12, 6, 1024),
    "mar_large": _released(1024, 16, 16, 8, 1280),
    "mar_huge": _released(1280, 20, 16, 12, 1536),
}


def mar_base(**kwargs: Any) -> MAR:
    return MAR(**{**MAR_SETTINGS["mar_base"], **kwargs})


def mar_large(**kwargs: Any) -> MAR:
    return MAR(**{**MAR_SETTINGS["mar_large"], **kwargs})


def mar_huge(**kwargs: Any) -> MAR:
    return MAR(**{**MAR_SETTINGS["mar_huge"], **kwargs})


MAR_MODELS: dict[str, Callable[..., MAR]] = {"mar_base": mar_base, "mar_large": mar_large, "mar_huge": mar_huge}


def check_arch(settings: Mapping[str, Any], source: str) -> None:
    """Catch constructor settings (MAR's defaults filled in) that would fail as shape errors deep inside."""
    for part in ("encoder", "decoder"):
        width, heads = settings[f"{part}_embed_dim"], settings[f"{part}_num_heads"]
        if heads < 1 or width % heads:
            raise ConfigError(f"{source}: arch.{part}_embed_dim {width} must split into arch.{part}_num_heads "
                              f"{heads} heads")
    img_size, stride, patch = settings["img_size"], settings["vae_stride"], settings["patch_size"]
    if img_size % stride or (img_size // stride) % patch or img_size < stride * patch:
        raise ConfigError(f"{source}: arch.img_size {img_size} must be a multiple of arch.vae_stride {stride} "
                          f"whose latent side is a multiple of arch.patch_size {patch}")

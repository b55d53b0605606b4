"""Config schemas of MAR's models: the `arch` sections of the KL-16 VAE and of the MAR prior.

Defaults are the released KL-16 VAE (kl16.ckpt): 256 px images -> 16 x 16 latents of 16 channels.
"""
from __future__ import annotations

from common.config import Field
from common.data import DATASET_SCHEMA

VAE_ARCH = {
    "type": Field(str, "kl-vae", choices=("kl-vae",), doc="model family: KL-regularised VAE (continuous latents)"),
    "embed_dim": Field(int, 16, doc="latent channels C (quant_conv gives 2C: mean and log-variance)", minimum=1),
    "z_channels": Field(int, None, doc="encoder output / decoder input channels; null: embed_dim"),
    "double_z": Field(bool, True, doc="the encoder itself outputs 2 * z_channels (mean and log-variance)"),
    "ch": Field(int, 128, doc="base width", minimum=1),
    "ch_mult": Field(list, [1, 1, 2, 2, 4], items=int, doc="width multiplier per level; len - 1 downsamplings"),
    "num_res_blocks": Field(int, 2, doc="residual blocks per encoder level (decoder: one more)", minimum=1),
    "resolution": Field(int, 256, doc="image size R; also the reference for the attention resolutions", minimum=1),
    "in_channels": Field(int, 3, doc="image channels", minimum=1),
    "out_ch": Field(int, 3, doc="decoded image channels", minimum=1),
    "encoder_attn_resolutions": Field(list, [16], items=int,
                                      doc="encoder levels (by resolution R / 2^i) with attention after each block"),
    "decoder_attn_resolutions": Field(list, [], items=int,
                                      doc="decoder levels with attention (the mid block always has it)"),
    "dropout": Field(float, 0.0, doc="dropout inside the residual blocks", minimum=0),
    "scale_factor": Field(float, 0.2325, doc="tokens = posterior sample * scale_factor (no shift)"),
    "checkpointing": Field(bool, False, doc="activation checkpointing of the conv/attention blocks in training"),
}

# A tokenizer config: what rebuilds a VAE from released weights, with the data it is evaluated on.
VAE_CONFIG = {
    "dataset": DATASET_SCHEMA,
    "arch": VAE_ARCH,
}

# MAR's `arch` section: the constructor arguments of mar/model.py's MAR. `model` names a released
# configuration whose widths, depths, heads, LayerNorm eps and DiffLoss size fill the fields left null;
# without one, null fields take MAR's own defaults (written in brackets).
MAR_ARCH = {
    "type": Field(str, "mar", choices=("mar",), doc="model family: MAR (masked autoregression + DiffLoss)"),
    "model": Field(str, None, choices=("mar_base", "mar_large", "mar_huge"),
                   doc="a released configuration (null: MAR's defaults for the null fields)"),
    "img_size": Field(int, 256, doc="image size; tokens per side = img_size / vae_stride / patch_size", minimum=1),
    "vae_stride": Field(int, 16, doc="image pixels per latent pixel", minimum=1),
    "patch_size": Field(int, 1, doc="latent pixels per token side", minimum=1),
    "vae_embed_dim": Field(int, 16, doc="latent channels of the tokenizer", minimum=1),
    "encoder_embed_dim": Field(int, None, doc="encoder width [1024]", minimum=1),
    "encoder_depth": Field(int, None, doc="[16]", minimum=1),
    "encoder_num_heads": Field(int, None, doc="[16]", minimum=1),
    "decoder_embed_dim": Field(int, None, doc="decoder width [1024]", minimum=1),
    "decoder_depth": Field(int, None, doc="[16]", minimum=1),
    "decoder_num_heads": Field(int, None, doc="[16]", minimum=1),
    "mlp_ratio": Field(float, 4.0),
    "norm_eps": Field(float, None, doc="LayerNorm eps of the transformer (1e-6 in the released models) [1e-5]"),
    "mask_ratio_min": Field(float, 0.7, doc="training masks a truncated-normal share in [mask_ratio_min, 1]",
                            minimum=0),
    "label_drop_prob": Field(float, 0.1, doc="labels replaced by the fake latent in training (guidance)", minimum=0),
    "class_num": Field(int, 1000, minimum=1),
    "attn_dropout": Field(float, 0.1, minimum=0),
    "proj_dropout": Field(float, 0.1, minimum=0),
    "buffer_size": Field(int, 64, doc="copies of the class embedding before the tokens", minimum=0),
    "diffloss_d": Field(int, None, doc="DiffLoss residual blocks (released: 6 / 8 / 12 for B / L / H) [3]",
                        minimum=1),
    "diffloss_w": Field(int, None, doc="DiffLoss width (released: 1024 / 1280 / 1536) [1024]", minimum=1),
    "num_sampling_steps": Field((str, int), "100", doc="default diffusion steps when sampling ('100', 'ddim50')"),
    "noise_schedule": Field(str, "cosine", choices=("cosine", "linear"),
                            doc="DiffLoss's beta schedule: the released models' cosine, or DDPM's linear "
                                "(see docs/mar.md)"),
    "diffusion_batch_mul": Field(int, 4, doc="diffusion draws per token in training", minimum=1),
    "grad_checkpointing": Field(bool, False, doc="recompute block activations in the backward pass"),
}

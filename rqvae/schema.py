"""Config schema of the RQ-VAE `arch` section, as the official stage-1 YAMLs and saved config.yaml write it.

Defaults are those the official set-up merges in (so a repository YAML and a released
config.yaml both validate); keys the model ignores are accepted because saved configs contain them.
"""
from __future__ import annotations

from common.config import Field

RQVAE_ARCH = {
    "type": Field(str, "rq-vae", choices=("rq-vae",), doc="model family"),
    "ema": Field(float, None, doc="decay of an EMA copy of the weights (null: none, as in every official config)"),
    "code_hier": Field(int, 1, doc="ignored (always 1 in official configs)"),
    "checkpointing": Field(bool, False, doc="activation checkpointing of the conv/attention blocks in training"),
    "hparams": {
        "bottleneck_type": Field(str, "rq", choices=("rq",), doc="residual quantization"),
        "embed_dim": Field(int, doc="width of the quantized latents (quant_conv output)"),
        "n_embed": Field(int, doc="codebook size"),
        "latent_shape": Field(list, items=int, doc="[H, W, C] of the latents; C = embed_dim"),
        "code_shape": Field(list, items=int, doc="[h, w, D]: code grid and depth"),
        "shared_codebook": Field(bool, doc="one codebook for every depth"),
        "decay": Field(float, 0.99, doc="EMA decay of the codebook"),
        "restart_unused_codes": Field(bool, False, doc="give codes with EMA count < 1 a random batch vector"),
        "loss_type": Field(str, "l1", choices=("mse", "l1"), doc="reconstruction loss"),
        "latent_loss_weight": Field(float, 0.25, doc="weight of the commitment loss"),
        "use_padding_idx": Field(bool, False, doc="ignored (official saved configs contain it)"),
        "masked_dropout": Field(float, 0.0, doc="ignored (official saved configs contain it)"),
    },
    "ddconfig": {
        "double_z": Field(bool, False, choices=(False,), doc="must be false for RQ-VAE"),
        "z_channels": Field(int, doc="encoder output / decoder input channels"),
        "resolution": Field(int, doc="image size R"),
        "in_channels": Field(int, doc="image channels (3)"),
        "out_ch": Field(int, doc="decoded image channels (3)"),
        "ch": Field(int, doc="base width"),
        "ch_mult": Field(list, items=int, doc="width multiplier per level; len - 1 downsamplings"),
        "num_res_blocks": Field(int, doc="residual blocks per encoder level (decoder: one more)"),
        "attn_resolutions": Field(list, items=int, doc="resolutions whose levels get attention after each block"),
        "dropout": Field(float, 0.0, doc="dropout inside the residual blocks"),
    },
}

"""Config schemas of the RQ-VAE and RQ-Transformer `arch` sections, as official YAMLs and config.yaml write them.

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
        "embed_dim": Field(int, doc="width of the quantized latents (quant_conv output)", minimum=1),
        "n_embed": Field(int, doc="codebook size", minimum=1),
        "latent_shape": Field(list, items=int, doc="[H, W, C] of the latents; C = embed_dim", minimum=1),
        "code_shape": Field(list, items=int, doc="[h, w, D]: code grid and depth", minimum=1),
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
        "z_channels": Field(int, doc="encoder output / decoder input channels", minimum=1),
        "resolution": Field(int, doc="image size R", minimum=1),
        "in_channels": Field(int, doc="image channels (3)", minimum=1),
        "out_ch": Field(int, doc="decoded image channels (3)", minimum=1),
        "ch": Field(int, doc="base width", minimum=1),
        "ch_mult": Field(list, items=int, doc="width multiplier per level; len - 1 downsamplings", minimum=1),
        "num_res_blocks": Field(int, doc="residual blocks per encoder level (decoder: one more)", minimum=1),
        "attn_resolutions": Field(list, items=int, doc="resolutions whose levels get attention after each block"),
        "dropout": Field(float, 0.0, doc="dropout inside the residual blocks"),
    },
}

ATTENTION_BLOCK = {
    "embed_dim": Field(int, None, doc="width; must equal arch.embed_dim (null: take it from there)", minimum=1),
    "n_head": Field(int, doc="attention heads", minimum=1),
    "mlp_bias": Field(bool, True),
    "attn_bias": Field(bool, True),
    "attn_pdrop": Field(float, 0.0, doc="dropout on the attention weights"),
    "resid_pdrop": Field(float, 0.1, doc="dropout on the attention and MLP outputs"),
    "gelu": Field(str, "v1", choices=("v1", "v2"), doc="v1: exact erf GELU; v2: x * sigmoid(1.702 x)"),
}

# The RQ-Transformer `arch` section: every field of the official RQTransformerConfig with its
# default (so released config.yaml files load as they are), plus our classifier-free guidance.
RQTRANSFORMER_ARCH = {
    "type": Field(str, "rq-transformer", choices=("rq-transformer",), doc="model family"),
    "ema": Field((bool, float), None, doc="whether training keeps an EMA copy of the weights"),
    "ar_hierarchy": Field(object, None, doc="ignored (official saved configs contain it)"),
    "vocab_size": Field((int, list), None, doc="codebook size of the RQ-VAE (or one equal value per depth)"),
    "block_size": Field(list, items=int, doc="[h, w, D]: code grid and depth", minimum=1),
    "vocab_size_cond": Field(int, 0, doc="classes (1 or 0: unconditional, cond_emb is a start token); text models: "
                                         "the text vocabulary size (0: that of the text tokenizer)", minimum=0),
    "block_size_cond": Field(int, 0, doc="condition tokens: 0 or 1, or the text context length of a text model "
                                         "(32 for CC-3M)", minimum=0),
    "embed_dim": Field(int, doc="transformer width C", minimum=1),
    "input_embed_dim": Field(int, None, doc="RQ-VAE codebook dimension", minimum=1),
    "use_padding_emb": Field(bool, False, doc="ignored (official saved configs contain it)"),
    "input_emb_vqvae": Field(bool, False, doc="spatial inputs from the RQ-VAE codebook through input_mlp"),
    "head_emb_vqvae": Field(bool, False, doc="depth inputs from the RQ-VAE codebook through head_mlp"),
    "scaled_head_emb_vqvae": Field(bool, False, doc="ignored (official saved configs contain it)"),
    "cumsum_depth_ctx": Field(bool, False, doc="depth inputs are cumulative sums of code vectors"),
    "shared_tok_emb": Field(bool, False, doc="one token table for every depth (when a table is used)"),
    "embd_pdrop": Field(float, 0.0, doc="dropout on the body's input sequence"),
    "body": {"n_layer": Field(int, doc="spatial transformer layers", minimum=1), "block": ATTENTION_BLOCK},
    "head": {"n_layer": Field(int, doc="depth transformer layers", minimum=1), "block": ATTENTION_BLOCK},
    "shared_cls_emb": Field(bool, False, doc="one output layer for every depth"),
    "cfg_null_class": Field(bool, False, doc="ours: an extra null class row in cond_emb for classifier-free guidance"),
    "class_dropout": Field(float, 0.0, doc="ours: probability of replacing the class by the null class in training"),
}

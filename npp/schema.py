"""Config schema of the LlamaGen VQ tokenizer's `arch` section (the official VQ ModelArgs plus the widths
the official classes fix: `ch` and `num_res_blocks`)."""
from __future__ import annotations

from common.config import Field
from common.data import DATASET_SCHEMA

VQ_ARCH = {
    "type": Field(str, "vq16", choices=("vq16",), doc="model family: LlamaGen VQ"),
    "codebook_size": Field(int, 16384),
    "codebook_embed_dim": Field(int, 8, doc="code vector dimension (quant_conv output)"),
    "codebook_l2_norm": Field(bool, True, choices=(True,), doc="codes and latents l2-normalised before the search"),
    "codebook_show_usage": Field(bool, True, choices=(True,), doc="keeps the codebook_used buffer of the state dict"),
    "commit_loss_beta": Field(float, 0.25),
    "entropy_loss_ratio": Field(float, 0.0),
    "encoder_ch_mult": Field(list, [1, 1, 2, 2, 4], items=int, doc="len - 1 downsamplings (VQ-8: [1, 2, 2, 4])"),
    "decoder_ch_mult": Field(list, [1, 1, 2, 2, 4], items=int),
    "z_channels": Field(int, 256),
    "dropout_p": Field(float, 0.0),
    "ch": Field(int, 128, doc="base width (fixed to 128 in the official classes)"),
    "num_res_blocks": Field(int, 2, doc="per encoder level; the decoder has one more"),
    "image_size": Field(int, 256, doc="the resolution images are resized to for this tokenizer"),
}

# A tokenizer config (used to rebuild released weights with another image size or dataset).
VQ_CONFIG = {
    "dataset": DATASET_SCHEMA,
    "arch": VQ_ARCH,
}

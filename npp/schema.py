"""Config schema of the LlamaGen VQ tokenizer's `arch` section (the official VQ ModelArgs plus the widths
the official classes fix: `ch` and `num_res_blocks`)."""
from __future__ import annotations

from common.config import Field
from common.data import DATASET_SCHEMA

VQ_ARCH = {
    "type": Field(str, "vq16", choices=("vq16",), doc="model family: LlamaGen VQ"),
    "codebook_size": Field(int, 16384, minimum=1),
    "codebook_embed_dim": Field(int, 8, doc="code vector dimension (quant_conv output)", minimum=1),
    "codebook_l2_norm": Field(bool, True, choices=(True,), doc="codes and latents l2-normalised before the search"),
    "codebook_show_usage": Field(bool, True, choices=(True,), doc="keeps the codebook_used buffer of the state dict"),
    "commit_loss_beta": Field(float, 0.25),
    "entropy_loss_ratio": Field(float, 0.0),
    "encoder_ch_mult": Field(list, [1, 1, 2, 2, 4], items=int, minimum=1,
                             doc="len - 1 downsamplings (VQ-8: [1, 2, 2, 4])"),
    "decoder_ch_mult": Field(list, [1, 1, 2, 2, 4], items=int, minimum=1),
    "z_channels": Field(int, 256, minimum=1),
    "dropout_p": Field(float, 0.0),
    "ch": Field(int, 128, doc="base width (fixed to 128 in the official classes)", minimum=1),
    "num_res_blocks": Field(int, 2, doc="per encoder level; the decoder has one more", minimum=1),
    "image_size": Field(int, 256, doc="the resolution images are resized to for this tokenizer", minimum=1),
}

# A tokenizer config (used to rebuild released weights with another image size or dataset).
VQ_CONFIG = {
    "dataset": DATASET_SCHEMA,
    "arch": VQ_ARCH,
}

# LlamaGen's class-conditional GPT (its ModelArgs; NPP trains it unchanged in shape).
GPT_ARCH = {
    "type": Field(str, "llamagen-gpt", choices=("llamagen-gpt",), doc="model family"),
    "dim": Field(int, doc="width", minimum=1),
    "n_layer": Field(int, minimum=1),
    "n_head": Field(int, doc="attention heads (head_dim = dim / n_head; 64, 100 in GPT-3B)", minimum=1),
    "multiple_of": Field(int, 256, minimum=1,
                         doc="the SwiGLU hidden size is 8 dim / 3 rounded up to a multiple of this"),
    "ffn_hidden": Field(int, None, doc="SwiGLU hidden size; null: from multiple_of", minimum=1),
    "vocab_size": Field(int, None, minimum=1,
                        doc="codebook size of the tokenizer (16384 for VQ-16); null: the tokenizer's"),
    "num_classes": Field(int, 1000, doc="classes; one more row of the class table is the null class", minimum=1),
    "image_tokens": Field(int, None, doc="codes per image, a square grid (256: 16x16 at 256 px with VQ-16); "
                                          "null: the tokenizer's", minimum=1),
    "rope_base": Field(float, 10000.0),
    "norm_eps": Field(float, 1e-5),
    "token_dropout_p": Field(float, 0.1),
    "resid_dropout_p": Field(float, 0.1),
    "ffn_dropout_p": Field(float, 0.1),
    "class_dropout_prob": Field(float, 0.1, doc="labels replaced by the null class in training"),
}

GPT_PRESETS = {  # LlamaGen's GPT_models: head_dim 64, but 100 in GPT-3B and 128 in GPT-7B
    "GPT-B": {"dim": 768, "n_layer": 12, "n_head": 12},
    "GPT-L": {"dim": 1024, "n_layer": 24, "n_head": 16},
    "GPT-XL": {"dim": 1280, "n_layer": 36, "n_head": 20},
    "GPT-XXL": {"dim": 1536, "n_layer": 48, "n_head": 24},
    "GPT-XXXL": {"dim": 2560, "n_layer": 48, "n_head": 40},
    "GPT-1B": {"dim": 2048, "n_layer": 22, "n_head": 32},
    "GPT-3B": {"dim": 3200, "n_layer": 24, "n_head": 32},
    "GPT-7B": {"dim": 4096, "n_layer": 32, "n_head": 32},
}

"""Model presets of the sampling-speed benchmark (the official measure_throughput/rq_defaults.yaml), as plain data.

Tokenizers are RQ-VAEs of 256x256 images downsampled f times; priors are RQ-Transformers named by
size. With depth d = 1 a prior has no depth transformer and a deeper spatial one. `tiny` is ours,
for quick CPU smoke runs; every other entry is the paper's.
"""
from __future__ import annotations

from typing import Any

from common.errors import ConfigError

TOKENIZERS = {  # f: the levels of the encoder/decoder
    32: {"ch_mult": [1, 1, 2, 2, 4, 4], "attn_resolutions": [8]},
    16: {"ch_mult": [1, 1, 2, 2, 4], "attn_resolutions": [16]},
    8: {"ch_mult": [1, 2, 2, 4], "attn_resolutions": [32]},
}

PRIORS = {  # layers: (spatial, depth) for d > 1; layers_d1: spatial layers for d = 1
    "huge": {"embed_dim": 1536, "n_head": 24, "layers": (42, 6), "layers_d1": 48},  # 1.4B
    "large": {"embed_dim": 1536, "n_head": 24, "layers": (24, 4), "layers_d1": 28},  # 800M
    "medium": {"embed_dim": 1024, "n_head": 16, "layers": (24, 4), "layers_d1": 28},  # 350M
    "small": {"embed_dim": 512, "n_head": 8, "layers": (24, 4), "layers_d1": 28},  # 90M
    "vqgan_large": {"embed_dim": 1664, "n_head": 16, "layers_d1": 24, "only": {"f": 16, "d": 1, "c": 1024}},
    "vqgan_huge": {"embed_dim": 1536, "n_head": 24, "layers_d1": 48, "only": {"f": 16, "d": 1, "c": 16384}},
    "tiny": {"embed_dim": 64, "n_head": 4, "layers": (2, 1), "layers_d1": 3},
}

IMAGE_SIZE = 256
CODE_DIM = 256  # codebook dimension of every preset RQ-VAE
NUM_CLASSES = 1000  # the priors are class-conditional; the benchmark samples class 0


def tokenizer_arch(f: int, d: int, c: int, ch: int = 128) -> dict[str, Any]:
    """The `arch` section of the preset RQ-VAE with downsampling f, depth d and c codes (base width ch)."""
    if f not in TOKENIZERS:
        raise ConfigError(f"f={f}: choose a downsampling factor from {', '.join(map(str, TOKENIZERS))}")
    side = IMAGE_SIZE // f
    return {
        "type": "rq-vae",
        "hparams": {"bottleneck_type": "rq", "embed_dim": CODE_DIM, "n_embed": c,
                    "latent_shape": [side, side, CODE_DIM], "code_shape": [side, side, d], "shared_codebook": True,
                    "decay": 0.99, "restart_unused_codes": True, "loss_type": "mse", "latent_loss_weight": 0.25},
        "ddconfig": {"double_z": False, "z_channels": CODE_DIM, "resolution": IMAGE_SIZE, "in_channels": 3, "out_ch": 3,
                     "ch": ch, "num_res_blocks": 2, "dropout": 0.0, **TOKENIZERS[f]},
    }


def prior_arch(model: str, f: int, d: int, c: int) -> dict[str, Any]:
    """The `arch` section of the preset RQ-Transformer `model` for the codes of `tokenizer_arch(f, d, c)`."""
    if model not in PRIORS:
        raise ConfigError(f"model={model}: choose from {', '.join(PRIORS)}")
    preset = PRIORS[model]
    only = preset.get("only")
    if only and (f, d, c) != (only["f"], only["d"], only["c"]):
        raise ConfigError(f"model={model} works only with f={only['f']} d={only['d']} c={only['c']}")
    body, head = preset["layers"] if d > 1 else (preset["layers_d1"], 0)
    side = IMAGE_SIZE // f
    return {
        "type": "rq-transformer", "vocab_size": c, "block_size": [side, side, d], "embed_dim": preset["embed_dim"],
        "input_embed_dim": CODE_DIM, "vocab_size_cond": NUM_CLASSES, "block_size_cond": 1,
        "input_emb_vqvae": True, "head_emb_vqvae": True, "cumsum_depth_ctx": True, "shared_tok_emb": True,
        "shared_cls_emb": True,
        "body": {"n_layer": body, "block": {"n_head": preset["n_head"]}},
        "head": {"n_layer": head, "block": {"n_head": preset["n_head"]}},
    }

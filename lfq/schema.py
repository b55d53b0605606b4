"""Config schemas of the LFQ tokenizer: our `arch` section and the official Open-MAGVIT2 YAML.

`LFQ_ARCH` uses the official names (`ddconfig`, `n_embed`, `embed_dim`, the two entropy
weights) so a researcher can carry values over from an official file. `OPENMAGVIT2_SCHEMA`
accepts the official LightningCLI files (`configs/Open-MAGVIT2/{gpu,npu}/imagenet_lfqgan_*.yaml`)
as they are, every key with the official default; the Lightning trainer and data sections are
kept as written.
"""
from __future__ import annotations

from common.config import ANY, OPEN, Field
from lfq.quantizer import ENTROPY_MODES

OFFICIAL_MODEL_CLASS = "src.Open_MAGVIT2.models.lfqgan.VQModel"
OFFICIAL_LOSS_CLASSES = ("src.Open_MAGVIT2.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                         "src.Open_MAGVIT2.modules.losses.vqperceptual.DummyLoss")

DDCONFIG = {
    "double_z": Field(bool, False, choices=(False,), doc="ignored; must be false"),
    "z_channels": Field(int, doc="latent channels K = number of code bits", minimum=1),
    "resolution": Field(int, None, doc="ignored by the official model (a leftover 128 in the 256 config)"),
    "in_channels": Field(int, 3, doc="image channels", minimum=1),
    "out_ch": Field(int, 3, doc="decoded image channels", minimum=1),
    "ch": Field(int, doc="base width", minimum=1),
    "ch_mult": Field(list, items=int, doc="width multiplier per level; len - 1 downsamplings", minimum=1),
    "num_res_blocks": Field(int, doc="residual blocks per level and in each middle stack", minimum=1),
}

LFQ_ARCH = {
    "type": Field(str, "lfq", choices=("lfq",), doc="model family"),
    "image_size": Field(int, doc="training / evaluation image size (the model is fully convolutional)", minimum=1),
    "ddconfig": DDCONFIG,
    "n_embed": Field(int, doc="codebook size 2^K", minimum=1),
    "embed_dim": Field(int, doc="code bits K; equals ddconfig.z_channels", minimum=1),
    "sample_minimization_weight": Field(float, 1.0, doc="weight of the per-sample entropy"),
    "batch_maximization_weight": Field(float, 1.0, doc="weight of the codebook entropy"),
    "entropy_mode": Field(str, "factorized", choices=ENTROPY_MODES,
                          doc="factorized (exact, fast) or full (official N x 2^K softmax)"),
}

LOSS_PARAMS = {
    "disc_start": Field(int, 0, doc="step from which the GAN terms are on", minimum=0),
    "codebook_weight": Field(float, 1.0, doc="weight of the entropy loss"),
    "pixelloss_weight": Field(float, 1.0, doc="stored, never used by the official loss"),
    "disc_num_layers": Field(int, 3, minimum=1),
    "disc_in_channels": Field(int, 3, minimum=1),
    "disc_factor": Field(float, 1.0),
    "disc_weight": Field(float, 1.0, doc="multiplier of the adaptive GAN weight (only if gen_loss_weight is null)"),
    "commit_weight": Field(float, 0.25),
    "codebook_enlarge_ratio": Field(float, 3.0, doc="> 0 boosts the entropy weight early in training"),
    "codebook_enlarge_steps": Field(int, 2000, minimum=0),
    "perceptual_weight": Field(float, 1.0),
    "use_actnorm": Field(bool, False),
    "disc_conditional": Field(bool, False),
    "disc_ndf": Field(int, 64, minimum=1),
    "disc_loss": Field(str, "hinge", choices=("hinge", "vanilla", "non_saturate")),
    "gen_loss_weight": Field(float, None, doc="fixed generator GAN weight (null: adaptive weight)"),
    "lecam_loss_weight": Field(float, None, doc="LeCAM regulariser weight (null: off)"),
}

VQMODEL_ARGS = {
    "ddconfig": DDCONFIG,
    "lossconfig": {
        "target": Field(str, OFFICIAL_LOSS_CLASSES[0], choices=OFFICIAL_LOSS_CLASSES),
        "params": LOSS_PARAMS,
    },
    "n_embed": Field(int, doc="codebook size 2^K", minimum=1),
    "embed_dim": Field(int, doc="code bits K", minimum=1),
    "sample_minimization_weight": Field(float),
    "batch_maximization_weight": Field(float),
    "ckpt_path": Field(str, None),
    "ignore_keys": Field(list, [], items=str),
    "image_key": Field(str, "image"),
    "colorize_nlabels": Field(int, None),
    "monitor": Field(str, None),
    "learning_rate": Field(float, None),
    "resume_lr": Field(float, None),
    "warmup_epochs": Field(float, 1.0),
    "scheduler_type": Field(str, "linear-warmup_cosine-decay",
                            choices=("None", "linear-warmup", "linear-warmup_cosine-decay")),
    "min_learning_rate": Field(float, 0.0),
    "use_ema": Field(bool, False),
    "token_factorization": Field(bool, False),
    "stage": Field(str, None),
    "lr_drop_epoch": Field(list, None, items=int),
    "lr_drop_rate": Field(float, 0.1),
    "factorized_bits": Field(list, [9, 9], items=int),
}

OPENMAGVIT2_SCHEMA = {
    "seed_everything": Field((bool, int), True),
    "trainer": {
        "accelerator": Field(str, "auto"),
        "strategy": Field(str, "auto"),
        "devices": Field((int, str, list), "auto"),
        "num_nodes": Field(int, 1),
        "precision": Field((str, int), "32-true"),
        "max_epochs": Field(int, None),
        "check_val_every_n_epoch": Field(int, 1),
        "num_sanity_val_steps": Field(int, 2),
        "log_every_n_steps": Field(int, 50),
        "callbacks": ANY,
        "logger": ANY,
        **OPEN,  # any other Lightning Trainer argument
    },
    "model": {
        "class_path": Field(str, choices=(OFFICIAL_MODEL_CLASS,), doc="the Open-MAGVIT2 tokenizer module"),
        "init_args": VQMODEL_ARGS,
    },
    "data": ANY,  # main.DataModuleFromConfig with ImageNet datasets; read by lfq.official.official_image_size
    "ckpt_path": Field(str, None, doc="Lightning checkpoint to resume"),
}

"""Stage-1 training of the LlamaGen VQ tokenizer, as LlamaGen's `vq_train.py` and `VQLoss` train it.

The step of common/gan_task.py with LlamaGen's terms: a generator step on

    reconstruction_weight * L2 + perceptual_weight * LPIPS + disc_weight * hinge g
    + codebook_weight * (codebook + commitment + entropy),

the quantizer's terms coming from its training-mode forward (npp/vq.py, which also advances the
codebook-usage window), then a discriminator step on the same detached reconstruction with
disc_weight * hinge. The GAN weight is fixed (LlamaGen's `disc_adaptive_weight` is off) unless
`loss.disc_adaptive_weight`; both GAN terms are there with weight 0 before `disc_start`, which
counts steps from 1 as LlamaGen's `global_step`. Both networks' gradients are clipped to
`optimizer.max_gn`; an EMA of the weights is optional (LlamaGen's `--ema`).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from common.config import Field
from common.data import DATASET_SCHEMA
from common.dist import DistEnv
from common.errors import ConfigError
from common.gan_task import LPIPS_FIELDS, RECONSTRUCTION_LOSSES, GANObjective, GANTokenizerTask
from common.losses import DISC_LOSSES, GEN_LOSSES, NLayerDiscriminator
from common.optim import OPTIMIZER_SCHEMA
from common.trainer import EXPERIMENT_SCHEMA
from npp.schema import VQ_ARCH
from npp.vq import VQLosses, VQTokenizer

STAGE1_SCHEMA = {
    "arch": VQ_ARCH,
    "dataset": DATASET_SCHEMA,
    "optimizer": OPTIMIZER_SCHEMA,  # both optimizers (generator and discriminator), as in vq_train.py
    "experiment": EXPERIMENT_SCHEMA,
    "loss": {  # vq_train.py's flags and VQLoss's arguments, with their defaults
        "reconstruction_loss": Field(str, "l2", choices=tuple(RECONSTRUCTION_LOSSES)),
        "reconstruction_weight": Field(float, 1.0),
        "perceptual_weight": Field(float, 1.0),
        "codebook_weight": Field(float, 1.0, doc="multiplies the quantizer's terms (LlamaGen adds them at 1)"),
        "disc_start": Field(int, 20000, doc="the first step (counted from 1) with the GAN terms", minimum=0),
        "disc_weight": Field(float, 0.5, doc="multiplies both GAN terms"),
        "disc_adaptive_weight": Field(bool, False, doc="VQGAN's adaptive generator weight (off in LlamaGen)"),
        "disc_type": Field(str, "patchgan", choices=("patchgan",)),
        "disc_loss": Field(str, "hinge", choices=("hinge", "vanilla")),
        "gen_loss": Field(str, "hinge", choices=("hinge",)),
        "disc_dim": Field(int, 64, doc="the PatchGAN's base width", minimum=1),
        "disc_num_layers": Field(int, 3, minimum=1),
        **LPIPS_FIELDS,
    },
    "ema": {
        "use_ema": Field(bool, False, doc="keep EMA copies of the weights; evaluate with them (LlamaGen's --ema)"),
        "decay": Field(float, 0.9999),
    },
    "seed": Field(int, 0),
}


def check_stage1_config(config: Mapping[str, Any]) -> None:
    """The images must be the size the saved tokenizer says it encodes (arch.image_size), so that its code grid is
    what a prior trained on it expects."""
    resolution, image_size = config["dataset"]["resolution"], config["arch"]["image_size"]
    if resolution is not None and resolution != image_size:
        raise ConfigError(f"dataset.resolution {resolution} differs from arch.image_size {image_size}; "
                          "train at the tokenizer's image size (set both alike)")


class VQStage1Task(GANTokenizerTask):
    """The TrainTask of the LlamaGen VQ tokenizer (see common/trainer.py)."""

    def __init__(self, config: Mapping[str, Any], env: DistEnv, steps_per_epoch: int, vgg_weights: str | None = None):
        check_stage1_config(config)
        self.loss_cfg = loss = config["loss"]
        model = VQTokenizer.from_config(config["arch"])
        discriminator = NLayerDiscriminator(3, loss["disc_dim"], loss["disc_num_layers"])
        reconstruction = RECONSTRUCTION_LOSSES[loss["reconstruction_loss"]]
        objective = GANObjective(reconstruction, loss["perceptual_weight"], loss["disc_start"],
                                 disc_loss=DISC_LOSSES[loss["disc_loss"]], gen_loss=GEN_LOSSES[loss["gen_loss"]],
                                 disc_weight=loss["disc_weight"],
                                 gen_loss_weight=None if loss["disc_adaptive_weight"] else loss["disc_weight"],
                                 disc_loss_weight=loss["disc_weight"],
                                 reconstruction_weight=loss["reconstruction_weight"])
        ema = config["ema"]
        super().__init__(config, env, steps_per_epoch, model, discriminator, objective,
                         ema_decay=ema["decay"] if ema["use_ema"] else None,
                         vgg_weights=vgg_weights or loss["vgg_weights"], lpips_random_trunk=loss["lpips_random_trunk"])

    def gan_on(self, step: int, epoch: int) -> bool:
        return step + 1 >= self.objective.disc_start  # LlamaGen's global_step is the 1-based step

    def regularization(self, aux: VQLosses, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.loss_cfg["codebook_weight"] * (aux.vq + aux.commit + aux.entropy)
        return loss, {"vq_loss": aux.vq.item(), "commit_loss": aux.commit.item(), "entropy_loss": aux.entropy.item(),
                      "codebook_usage": aux.usage}

    def eval_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        recon, _, codes = self.model(x)  # eval mode: no quantizer losses, the usage window stays
        return recon, {}, codes

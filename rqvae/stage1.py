"""Stage-1 training of RQ-VAE: reconstruction + commitment + LPIPS + PatchGAN with the adaptive weight.

The step of common/gan_task.py as the official trainer takes it: the GAN terms start at epoch
`disc_start`, before which the discriminator is left alone, and the discriminator's loss is
scaled by disc_weight too. The codebook is trained by EMA inside the forward pass.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from common.config import ANY, Field
from common.data import DATASET_SCHEMA
from common.dist import DistEnv
from common.gan_task import LPIPS_FIELDS, GANObjective, GANTokenizerTask
from common.losses import DISC_LOSSES, GEN_LOSSES, NLayerDiscriminator
from common.optim import OPTIMIZER_SCHEMA
from common.trainer import EXPERIMENT_SCHEMA
from rqvae.schema import RQVAE_ARCH
from rqvae.vqvae import RQVAE

STAGE1_SCHEMA = {
    "arch": RQVAE_ARCH,
    "dataset": DATASET_SCHEMA,
    "optimizer": OPTIMIZER_SCHEMA,
    "experiment": EXPERIMENT_SCHEMA,
    "gan": {
        "disc": {
            "arch": {
                "in_channels": Field(int, 3, minimum=1),
                "num_layers": Field(int, 2, minimum=1),
                "use_actnorm": Field(bool, False),
                "ndf": Field(int, 64, minimum=1),
                "spectral_norm": Field(bool, False, doc="accepted for the official configs; unused there too"),
            },
            "optimizer": Field(dict, None, doc="defaults to a copy of `optimizer`"),
        },
        "loss": {
            "disc_loss": Field(str, "hinge", choices=tuple(DISC_LOSSES)),
            "gen_loss": Field(str, "vanilla", choices=tuple(GEN_LOSSES)),
            "disc_weight": Field(float, 0.75),
            "perceptual_weight": Field(float, 1.0),
            "disc_start": Field(int, 0, doc="first epoch with the GAN losses", minimum=0),
            **LPIPS_FIELDS,
        },
    },
    "seed": Field(int, 0),
    "runtime": ANY,
    "result_path": ANY,
}


class RQVAEStage1Task(GANTokenizerTask):
    """The TrainTask of RQ-VAE (see common/trainer.py)."""

    gan_terms_before_start = False  # no discriminator forward or step before disc_start

    def __init__(self, config: Mapping[str, Any], env: DistEnv, steps_per_epoch: int, vgg_weights: str | None = None):
        hparams = config["arch"]["hparams"]
        gan = config["gan"]
        loss, disc_arch = gan["loss"], gan["disc"]["arch"]
        self.latent_loss_weight = hparams["latent_loss_weight"]
        model = RQVAE.from_config(config["arch"])
        discriminator = NLayerDiscriminator(disc_arch["in_channels"], disc_arch["ndf"], disc_arch["num_layers"],
                                            disc_arch["use_actnorm"])
        objective = GANObjective(F.mse_loss if hparams["loss_type"] == "mse" else F.l1_loss,
                                 loss["perceptual_weight"], loss["disc_start"],
                                 disc_loss=DISC_LOSSES[loss["disc_loss"]], gen_loss=GEN_LOSSES[loss["gen_loss"]],
                                 disc_weight=loss["disc_weight"], disc_loss_weight=loss["disc_weight"])
        epochs = config["experiment"]["epochs"]
        super().__init__(config, env, steps_per_epoch, model, discriminator, objective,
                         disc_optimizer={**config["optimizer"], **(gan["disc"]["optimizer"] or {})},
                         disc_epochs=max(1, epochs - loss["disc_start"]),  # it steps from disc_start on only
                         vgg_weights=vgg_weights or loss["vgg_weights"], lpips_random_trunk=loss["lpips_random_trunk"])

    def gan_on(self, step: int, epoch: int) -> bool:
        return epoch >= self.objective.disc_start  # the RQ-VAE counts disc_start in epochs

    def regularization(self, commitment: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self.latent_loss_weight * commitment, {"loss_latent": commitment.item()}

    def eval_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        recon, commitment, codes = self.model(x)
        return recon, {"loss_latent": commitment.item()}, codes

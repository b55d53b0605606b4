"""Stage-1 training of the KL-VAE, as latent diffusion's autoencoders (which MAR's KL-16 is) are trained.

The step of common/gan_task.py with LDM's terms: a generator step on

    L1 + perceptual_weight * LPIPS + kl_weight * KL + adaptive weight * disc_weight * g,

KL the posterior's divergence from N(0, I) summed over a latent and averaged over the batch, g
the hinge generator loss -mean D(recon); then a hinge discriminator step on the same detached
reconstruction. disc_start counts steps; before it both GAN terms are there with weight 0.
Evaluation and previews decode the posterior mean.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from common.config import Field
from common.data import DATASET_SCHEMA
from common.dist import DistEnv
from common.gan_task import LPIPS_FIELDS, GANObjective, GANTokenizerTask, discriminator_from_loss_section
from common.losses import DISC_LOSSES, hinge_g_loss
from common.optim import OPTIMIZER_SCHEMA
from common.tokenizer import DiagonalGaussian
from common.trainer import EXPERIMENT_SCHEMA
from mar.schema import VAE_ARCH
from mar.vae import KLVAE

STAGE1_SCHEMA = {
    "arch": VAE_ARCH,
    "dataset": DATASET_SCHEMA,
    "optimizer": OPTIMIZER_SCHEMA,  # LDM: Adam, betas (0.5, 0.9), constant lr, for both networks
    "experiment": EXPERIMENT_SCHEMA,
    "loss": {  # the names and (kl-f16) values of LDM's LPIPSWithDiscriminator
        "disc_start": Field(int, 50001, doc="first step with the GAN terms"),
        "kl_weight": Field(float, 1e-6),
        "disc_weight": Field(float, 0.5, doc="multiplier of the adaptive generator weight"),
        "disc_factor": Field(float, 1.0, doc="multiplies both GAN terms from disc_start on"),
        "perceptual_weight": Field(float, 1.0),
        "disc_num_layers": Field(int, 3),
        "disc_in_channels": Field(int, 3),
        "disc_ndf": Field(int, 64),
        "use_actnorm": Field(bool, False),
        "disc_loss": Field(str, "hinge", choices=("hinge", "vanilla")),
        **LPIPS_FIELDS,
    },
    "seed": Field(int, 0),
}


class KLVAEStage1Task(GANTokenizerTask):
    """The TrainTask of the KL-VAE (see common/trainer.py)."""

    def __init__(self, config: Mapping[str, Any], env: DistEnv, steps_per_epoch: int, vgg_weights: str | None = None):
        loss = config["loss"]
        self.kl_weight = loss["kl_weight"]
        model = KLVAE.from_config(config["arch"])
        discriminator = discriminator_from_loss_section(loss)
        objective = GANObjective(F.l1_loss, loss["perceptual_weight"], loss["disc_start"],
                                 disc_loss=DISC_LOSSES[loss["disc_loss"]], gen_loss=hinge_g_loss,
                                 disc_weight=loss["disc_weight"], disc_factor=loss["disc_factor"])
        super().__init__(config, env, steps_per_epoch, model, discriminator, objective,
                         vgg_weights=vgg_weights or loss["vgg_weights"], lpips_random_trunk=loss["lpips_random_trunk"])

    def regularization(self, posterior: DiagonalGaussian, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss_kl = posterior.kl().mean()
        return self.kl_weight * loss_kl, {"loss_kl": loss_kl.item()}

    def eval_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], None]:
        recon, posterior = self.model(x, sample_posterior=False)
        return recon, {"loss_kl": posterior.kl().mean().item()}, None

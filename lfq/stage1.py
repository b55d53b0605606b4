"""Stage-1 training of the Open-MAGVIT2 tokenizer.

The step of common/gan_task.py with the official terms: a generator step on

    L1 (or L2) + perceptual_weight * LPIPS + gen_loss_weight * g + codebook_weight * (H_s - H_c)
    + commit_weight * commitment,

g the non-saturating loss of each image's mean PatchGAN logit, then a discriminator step on
the same detached reconstruction with hinge + lecam_weight * LeCAM. disc_start counts steps;
before it both GAN terms are there with weight 0. Exponential moving averages (decay 0.999)
follow the generator and the discriminator after both steps, and evaluation runs with both
averages swapped in, as in the official code.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from common.config import Field
from common.data import DATASET_SCHEMA, resolve_transform
from common.dist import DistEnv
from common.errors import ConfigError
from common.gan_task import (LPIPS_FIELDS, RECONSTRUCTION_LOSSES, GANObjective, GANTokenizerTask,
                             discriminator_from_loss_section)
from common.losses import DISC_LOSSES, image_mean_non_saturating_g_loss
from common.optim import OPTIMIZER_SCHEMA
from common.trainer import EXPERIMENT_SCHEMA
from lfq.model import LFQTokenizer
from lfq.quantizer import LFQLosses
from lfq.schema import LFQ_ARCH, LOSS_PARAMS

STAGE1_SCHEMA = {
    "arch": LFQ_ARCH,
    "dataset": DATASET_SCHEMA,
    "optimizer": OPTIMIZER_SCHEMA,  # both Adam optimizers (generator and discriminator), as in the official code
    "experiment": EXPERIMENT_SCHEMA,
    "loss": {  # the official `lossconfig.params` names and defaults, plus what the official code fixes
        **LOSS_PARAMS,
        "reconstruction_loss": Field(str, "l1", choices=tuple(RECONSTRUCTION_LOSSES), doc="official: l1"),
        **LPIPS_FIELDS,
    },
    "ema": {
        "use_ema": Field(bool, True, doc="keep EMA copies of the generator and discriminator; evaluate with them"),
        "decay": Field(float, 0.999),
    },
    "seed": Field(int, 0),
}


def check_stage1_config(config: Mapping[str, Any]) -> None:
    """Catch settings the training cannot honour before any model is built."""
    loss, dataset = config["loss"], config["dataset"]
    if loss["disc_conditional"]:
        raise ConfigError("loss.disc_conditional: a class-conditional discriminator is not supported "
                          "(neither by Open-MAGVIT2); set it to false")
    resolution = dataset["resolution"]
    if resolution is None:  # the defaults of common.data.build_dataset
        transform = dataset["transforms"]["type"]
        named = resolve_transform(transform, None)[1] if transform else None
        resolution = 32 if dataset["type"] == "shapes" else named or 256
    if resolution != config["arch"]["image_size"]:
        raise ConfigError(f"dataset.resolution {resolution} differs from arch.image_size "
                          f"{config['arch']['image_size']}; train at the model's image size (set both alike)")


class LFQStage1Task(GANTokenizerTask):
    """The TrainTask of the Open-MAGVIT2 tokenizer (see common/trainer.py)."""

    def __init__(self, config: Mapping[str, Any], env: DistEnv, steps_per_epoch: int, vgg_weights: str | None = None):
        check_stage1_config(config)
        self.loss_cfg = loss = config["loss"]
        model = LFQTokenizer.from_config(config["arch"])
        discriminator = discriminator_from_loss_section(loss)
        objective = GANObjective(RECONSTRUCTION_LOSSES[loss["reconstruction_loss"]], loss["perceptual_weight"],
                                 loss["disc_start"], disc_loss=DISC_LOSSES[loss["disc_loss"]],
                                 gen_loss=image_mean_non_saturating_g_loss, disc_weight=loss["disc_weight"],
                                 gen_loss_weight=loss["gen_loss_weight"], disc_factor=loss["disc_factor"],
                                 lecam_weight=loss["lecam_loss_weight"])
        ema = config["ema"]
        super().__init__(config, env, steps_per_epoch, model, discriminator, objective,
                         ema_decay=ema["decay"] if ema["use_ema"] else None,
                         vgg_weights=vgg_weights or loss["vgg_weights"], lpips_random_trunk=loss["lpips_random_trunk"])

    def entropy_weight(self, step: int) -> float:
        """codebook_weight, boosted early in training when codebook_enlarge_ratio > 0."""
        ratio, steps = self.loss_cfg["codebook_enlarge_ratio"], self.loss_cfg["codebook_enlarge_steps"]
        boost = 1.0 + ratio * max(0.0, 1.0 - step / steps) if ratio > 0 else 1.0
        return self.loss_cfg["codebook_weight"] * boost

    def regularization(self, aux: LFQLosses, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.entropy_weight(step) * aux.entropy_aux + self.loss_cfg["commit_weight"] * aux.commitment
        return loss, {"entropy_aux": aux.entropy_aux.item(), **entropy_logs(aux)}

    def eval_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        z = self.model.encode(x)
        quant, _, codes = self.model.quantize(z)
        aux = self.model.quantize.losses(z, quant)  # eval mode returns zeros; the entropies are worth seeing
        return self.model.decode(quant), entropy_logs(aux), codes


def entropy_logs(aux: LFQLosses) -> dict[str, float]:
    return {"per_sample_entropy": aux.per_sample_entropy.item(), "codebook_entropy": aux.codebook_entropy.item(),
            "commitment": aux.commitment.item()}

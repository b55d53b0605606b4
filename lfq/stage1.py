"""Stage-1 training of the Open-MAGVIT2 tokenizer (spec lfq.md sections 7-8).

Each step reconstructs the batch once, takes a generator step on

    L1 (or L2) + perceptual_weight * LPIPS + gen_loss_weight * g + codebook_weight * (H_s - H_c)
    + commit_weight * commitment,

g the non-saturating loss of each image's mean PatchGAN logit, then a discriminator step on
the same detached reconstruction with hinge + lecam_weight * LeCAM. Exponential moving
averages (decay 0.999) follow the generator and the discriminator after both steps, and
evaluation runs with both averages swapped in, as in the official code.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from common.config import Field
from common.data import DATASET_SCHEMA, resolve_transform
from common.dist import DistEnv, all_reduce_mean, all_reduce_sum, is_distributed, sync_gradients
from common.ema import ModelEMA
from common.errors import ConfigError
from common.losses import (DISC_LOSSES, LPIPS, LeCAMRegularizer, NLayerDiscriminator, adaptive_generator_weight,
                           image_mean_non_saturating_g_loss)
from common.metrics import code_counts, usage_from_counts
from common.optim import OPTIMIZER_SCHEMA, build_optimizer, build_scheduler
from common.trainer import EXPERIMENT_SCHEMA, Position
from lfq.model import LFQTokenizer
from lfq.quantizer import LFQLosses
from lfq.schema import LFQ_ARCH, LOSS_PARAMS

RECONSTRUCTION_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}

STAGE1_SCHEMA = {
    "arch": LFQ_ARCH,
    "dataset": DATASET_SCHEMA,
    "optimizer": OPTIMIZER_SCHEMA,  # both Adam optimizers (generator and discriminator), as in the official code
    "experiment": EXPERIMENT_SCHEMA,
    "loss": {  # the official `lossconfig.params` names and defaults, plus what the official code fixes
        **LOSS_PARAMS,
        "reconstruction_loss": Field(str, "l1", choices=tuple(RECONSTRUCTION_LOSSES), doc="official: l1"),
        "vgg_weights": Field(str, None, doc="local vgg16-397923af.pth for LPIPS (else the torch hub cache)"),
        "lpips_random_trunk": Field(bool, False, doc="tests only: LPIPS on an untrained VGG trunk"),
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


class LFQStage1Task:
    """The TrainTask of the Open-MAGVIT2 tokenizer (see common/trainer.py)."""

    def __init__(self, config: Mapping[str, Any], env: DistEnv, steps_per_epoch: int, vgg_weights: str | None = None):
        check_stage1_config(config)
        self.env = env
        device = env.device
        self.loss_cfg = loss = config["loss"]
        self.amp = config["experiment"]["amp"] and device.type == "cuda"

        self.model = LFQTokenizer.from_config(config["arch"]).to(device)
        self.discriminator = NLayerDiscriminator(loss["disc_in_channels"], loss["disc_ndf"], loss["disc_num_layers"],
                                                 loss["use_actnorm"]).to(device)
        self.lpips = None
        if loss["perceptual_weight"] > 0:
            self.lpips = LPIPS(vgg_weights or loss["vgg_weights"], random_trunk=loss["lpips_random_trunk"]).to(device)
        self.lecam = LeCAMRegularizer() if loss["lecam_loss_weight"] is not None else None
        self.train_model = DistributedDataParallel(self.model) if is_distributed() else self.model
        self.reconstruction_loss = RECONSTRUCTION_LOSSES[loss["reconstruction_loss"]]
        self.disc_loss = DISC_LOSSES[loss["disc_loss"]]

        epochs = config["experiment"]["epochs"]
        self.optimizer = build_optimizer(self.model.parameters(), config["optimizer"])
        self.scheduler = build_scheduler(self.optimizer, config["optimizer"], steps_per_epoch, epochs, env.world_size)
        self.disc_optimizer = build_optimizer(self.discriminator.parameters(), config["optimizer"])
        self.disc_scheduler = build_scheduler(self.disc_optimizer, config["optimizer"], steps_per_epoch, epochs,
                                              env.world_size)
        self.ema_decay = config["ema"]["decay"] if config["ema"]["use_ema"] else None
        self.restart_ema()

    def restart_ema(self) -> None:
        """Start the averages from the current weights (at construction and after loading starting weights)."""
        self.ema = self.disc_ema = None
        if self.ema_decay is not None:
            self.ema = ModelEMA(self.model, self.ema_decay)
            self.disc_ema = ModelEMA(self.discriminator, self.ema_decay)

    def state_objects(self) -> dict[str, Any]:
        objects = {"model": self.model, "discriminator": self.discriminator, "optimizer": self.optimizer,
                   "scheduler": self.scheduler, "disc_optimizer": self.disc_optimizer,
                   "disc_scheduler": self.disc_scheduler}
        if self.ema is not None:
            objects.update(ema=self.ema, disc_ema=self.disc_ema)
        if self.lecam is not None:
            objects["lecam"] = self.lecam
        return objects

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def perceptual(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        if self.lpips is None:
            return x.new_zeros(())
        with self.autocast():
            return self.lpips(x, recon).float().mean()

    def disc_factor(self, step: int) -> float:
        return self.loss_cfg["disc_factor"] if step >= self.loss_cfg["disc_start"] else 0.0

    def entropy_weight(self, step: int) -> float:
        """codebook_weight, boosted early in training when codebook_enlarge_ratio > 0."""
        ratio, steps = self.loss_cfg["codebook_enlarge_ratio"], self.loss_cfg["codebook_enlarge_steps"]
        boost = 1.0 + ratio * max(0.0, 1.0 - step / steps) if ratio > 0 else 1.0
        return self.loss_cfg["codebook_weight"] * boost

    # ------------------------------------------------------------------------------------------
    # The two losses of a step
    # ------------------------------------------------------------------------------------------

    def generator_loss(self, x: torch.Tensor, recon: torch.Tensor, aux: LFQLosses,
                       step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The generator objective on a reconstruction (graph kept for the backward pass)."""
        loss_cfg = self.loss_cfg
        loss_recon = self.reconstruction_loss(recon, x)
        loss_lpips = self.perceptual(x, recon)
        nll = loss_recon + loss_cfg["perceptual_weight"] * loss_lpips
        with self.autocast():
            logits_fake = self.discriminator(recon)
        loss_gen = image_mean_non_saturating_g_loss(logits_fake.float())
        if loss_cfg["gen_loss_weight"] is not None:
            gen_weight = x.new_tensor(loss_cfg["gen_loss_weight"])
        else:  # VQGAN's adaptive weight, only when no fixed weight is given
            gen_weight = adaptive_generator_weight(nll, loss_gen, self.model.last_layer) * loss_cfg["disc_weight"]
        loss = (nll + self.disc_factor(step) * gen_weight * loss_gen + self.entropy_weight(step) * aux.entropy_aux
                + loss_cfg["commit_weight"] * aux.commitment)
        logs = {"loss_total": loss.item(), "loss_recon": loss_recon.item(), "loss_lpips": loss_lpips.item(),
                "loss_gen": loss_gen.item(), "gen_weight": gen_weight.item(), "entropy_aux": aux.entropy_aux.item(),
                "per_sample_entropy": aux.per_sample_entropy.item(), "codebook_entropy": aux.codebook_entropy.item(),
                "commitment": aux.commitment.item()}
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge (or the configured) loss on real and detached fake, each in its own call (own BatchNorm
        statistics), plus the LeCAM regulariser."""
        with self.autocast():
            logits_real = self.discriminator(x).float()
            logits_fake = self.discriminator(recon.detach()).float()
        loss_adv = self.disc_loss(logits_real, logits_fake)
        loss_lecam = x.new_zeros(())
        if self.lecam is not None:
            # The averages follow the global batch, so every rank holds the same state and a resume restores
            # it exactly (the official code keeps one per rank and never saves it).
            means = torch.stack([logits_real.detach().mean(), logits_fake.detach().mean()])
            all_reduce_mean(means)
            self.lecam.update(means[0], means[1])
            loss_lecam = self.lecam.loss(logits_real, logits_fake)
        weight = self.loss_cfg["lecam_loss_weight"] or 0.0
        loss = self.disc_factor(step) * (weight * loss_lecam + loss_adv)
        logs = {"loss_disc": loss.item(), "loss_disc_adv": loss_adv.item(), "loss_lecam": loss_lecam.item(),
                "logits_real": logits_real.mean().item(), "logits_fake": logits_fake.mean().item()}
        return loss, logs

    # ------------------------------------------------------------------------------------------
    # The TrainTask interface
    # ------------------------------------------------------------------------------------------

    def train_step(self, batch: dict, position: Position) -> dict[str, float]:
        """Generator step, discriminator step, EMA updates. Before disc_start both GAN terms are there with
        weight 0 (as in the official code: the discriminator's BatchNorm statistics and LeCAM averages move)."""
        x = batch["image"].to(self.env.device)
        lr = self.optimizer.param_groups[0]["lr"]
        with self.autocast():
            recon, aux, _ = self.train_model(x)  # computed once: both steps see this reconstruction
        recon = recon.float()

        loss, logs = self.generator_loss(x, recon, aux, position.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

        loss_disc, disc_logs = self.discriminator_loss(x, recon, position.step)
        self.disc_optimizer.zero_grad(set_to_none=True)  # drops what the generator step left on D
        loss_disc.backward()
        sync_gradients(self.discriminator)
        self.disc_optimizer.step()
        self.disc_scheduler.step()

        if self.ema is not None:
            self.ema.update(self.model)
            self.disc_ema.update(self.discriminator)
        return {**logs, **disc_logs, "lr": lr}

    @contextlib.contextmanager
    def eval_weights(self):
        """Both networks in eval mode with their EMA weights (when kept); training weights and mode come back."""
        with contextlib.ExitStack() as stack:
            if self.ema is not None:
                stack.enter_context(self.ema.swapped_in(self.model))
                stack.enter_context(self.disc_ema.swapped_in(self.discriminator))
            self.model.eval()
            self.discriminator.eval()
            try:
                yield
            finally:
                self.model.train()
                self.discriminator.train()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        """Mean losses and entropies per batch, and codebook usage over the whole split (all ranks)."""
        totals: dict[str, float] = {}
        count = 0
        counts = torch.zeros(self.model.vocab_size, dtype=torch.long, device=self.env.device)
        with self.eval_weights(), self.autocast():
            for batch in batches:
                x = batch["image"].to(self.env.device)
                z = self.model.encode(x)
                quant, _, codes = self.model.quantize(z)
                aux = self.model.quantize.losses(z, quant)  # eval mode returns zeros; the entropies are worth seeing
                recon = self.model.decode(quant).float()
                logits_fake = self.discriminator(recon).float()
                values = {"loss_recon": self.reconstruction_loss(recon, x).item(),
                          "loss_lpips": self.perceptual(x, recon).item(),
                          "loss_gen": image_mean_non_saturating_g_loss(logits_fake).item(),
                          "per_sample_entropy": aux.per_sample_entropy.item(),
                          "codebook_entropy": aux.codebook_entropy.item(), "commitment": aux.commitment.item()}
                for key, value in values.items():
                    totals[key] = totals.get(key, 0.0) + value
                count += 1
                counts += code_counts(codes, self.model.vocab_size)
        logs = {key: value / max(count, 1) for key, value in totals.items()}
        counts = all_reduce_sum(counts)
        if counts.sum() > 0:
            logs.update(usage_from_counts(counts.cpu()))
        return logs

    @torch.no_grad()
    def preview(self, batch: dict) -> torch.Tensor:
        x = batch["image"].to(self.env.device)
        with self.eval_weights(), self.autocast():
            recon = self.model(x)[0].float().clamp(-1, 1)
        return torch.cat([x, recon]).cpu()

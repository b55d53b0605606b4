"""Stage-1 training of RQ-VAE: reconstruction + commitment + LPIPS + PatchGAN with the adaptive weight.

The step follows the official trainer (spec section 3.3): one generator step on the
reconstruction, commitment, perceptual and adversarial losses, then one discriminator step
on the same (detached) reconstruction. The codebook is trained by EMA inside the forward pass.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from common.config import ANY, Field
from common.dist import DistEnv, all_gather_cat, is_distributed, sync_gradients
from common.losses import DISC_LOSSES, GEN_LOSSES, LPIPS, NLayerDiscriminator, adaptive_generator_weight
from common.optim import OPTIMIZER_SCHEMA, build_optimizer, build_scheduler
from common.data import DATASET_SCHEMA
from common.trainer import EXPERIMENT_SCHEMA, Position
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
                "in_channels": Field(int, 3),
                "num_layers": Field(int, 2),
                "use_actnorm": Field(bool, False),
                "ndf": Field(int, 64),
                "spectral_norm": Field(bool, False, doc="accepted for the official configs; unused there too"),
            },
            "optimizer": Field(dict, None, doc="defaults to a copy of `optimizer`"),
        },
        "loss": {
            "disc_loss": Field(str, "hinge", choices=tuple(DISC_LOSSES)),
            "gen_loss": Field(str, "vanilla", choices=tuple(GEN_LOSSES)),
            "disc_weight": Field(float, 0.75),
            "perceptual_weight": Field(float, 1.0),
            "disc_start": Field(int, 0, doc="first epoch with the GAN losses"),
            "vgg_weights": Field(str, None, doc="local vgg16-397923af.pth for LPIPS (else the torch hub cache)"),
            "lpips_random_trunk": Field(bool, False, doc="tests only: LPIPS on an untrained VGG trunk"),
        },
    },
    "seed": Field(int, 0),
    "runtime": ANY,
    "result_path": ANY,
}


class RQVAEStage1Task:
    """The TrainTask of RQ-VAE (see common/trainer.py)."""

    def __init__(self, config: Mapping[str, Any], env: DistEnv, steps_per_epoch: int, vgg_weights: str | None = None):
        self.env = env
        device = env.device
        hparams = config["arch"]["hparams"]
        gan = config["gan"]
        self.loss_cfg = gan["loss"]
        self.latent_loss_weight = hparams["latent_loss_weight"]
        self.recon_loss = F.mse_loss if hparams["loss_type"] == "mse" else F.l1_loss

        self.model = RQVAE.from_config(config["arch"]).to(device)
        disc_arch = gan["disc"]["arch"]
        self.discriminator = NLayerDiscriminator(disc_arch["in_channels"], disc_arch["ndf"], disc_arch["num_layers"],
                                                 disc_arch["use_actnorm"]).to(device)
        self.lpips = None
        if self.loss_cfg["perceptual_weight"] > 0:
            self.lpips = LPIPS(vgg_weights or self.loss_cfg["vgg_weights"],
                               random_trunk=self.loss_cfg["lpips_random_trunk"]).to(device)
        self.train_model = DistributedDataParallel(self.model) if is_distributed() else self.model

        epochs = config["experiment"]["epochs"]
        self.optimizer = build_optimizer(self.model.parameters(), config["optimizer"])
        self.scheduler = build_scheduler(self.optimizer, config["optimizer"], steps_per_epoch, epochs, env.world_size)
        disc_optim_cfg = gan["disc"]["optimizer"] or config["optimizer"]
        disc_optim_cfg = {**config["optimizer"], **disc_optim_cfg}
        self.disc_optimizer = build_optimizer(self.discriminator.parameters(), disc_optim_cfg)
        self.disc_scheduler = build_scheduler(self.disc_optimizer, disc_optim_cfg, steps_per_epoch,
                                              max(1, epochs - self.loss_cfg["disc_start"]), env.world_size)
        self.gen_loss = GEN_LOSSES[self.loss_cfg["gen_loss"]]
        self.disc_loss = DISC_LOSSES[self.loss_cfg["disc_loss"]]

    def state_objects(self) -> dict[str, Any]:
        return {"model": self.model, "discriminator": self.discriminator, "optimizer": self.optimizer,
                "scheduler": self.scheduler, "disc_optimizer": self.disc_optimizer,
                "disc_scheduler": self.disc_scheduler}

    def perceptual(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return self.lpips(x, recon).mean() if self.lpips is not None else x.new_zeros(())

    def train_step(self, batch: dict, position: Position) -> dict[str, float]:
        x = batch["image"].to(self.env.device)
        gan_on = position.epoch >= self.loss_cfg["disc_start"]
        disc_weight = self.loss_cfg["disc_weight"]

        recon, commitment, codes = self.train_model(x)
        loss_recon = self.recon_loss(recon, x)
        loss_lpips = self.perceptual(x, recon)
        nll = loss_recon + self.loss_cfg["perceptual_weight"] * loss_lpips
        loss_gen = x.new_zeros(())
        gen_weight = x.new_zeros(())
        if gan_on:
            loss_gen = self.gen_loss(self.discriminator(recon))
            gen_weight = adaptive_generator_weight(nll, loss_gen, self.model.last_layer) * disc_weight
        loss = nll + self.latent_loss_weight * commitment + gen_weight * loss_gen
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

        logs = {"loss_total": loss.item(), "loss_recon": loss_recon.item(), "loss_latent": commitment.item(),
                "loss_lpips": loss_lpips.item(), "loss_gen": loss_gen.item(), "gen_weight": gen_weight.item(),
                "lr": self.scheduler.get_last_lr()[0]}
        if gan_on:
            self.disc_optimizer.zero_grad(set_to_none=True)
            logits_real = self.discriminator(x)
            logits_fake = self.discriminator(recon.detach())
            loss_disc = disc_weight * self.disc_loss(logits_real, logits_fake)
            loss_disc.backward()
            sync_gradients(self.discriminator)
            self.disc_optimizer.step()
            self.disc_scheduler.step()
            logs.update(loss_disc=loss_disc.item(), logits_real=logits_real.mean().item(),
                        logits_fake=logits_fake.mean().item())
        return logs

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        self.model.eval()
        totals: dict[str, float] = {}
        count = 0
        all_codes = []
        for batch in batches:
            x = batch["image"].to(self.env.device)
            recon, commitment, codes = self.model(x)
            values = {"loss_recon": self.recon_loss(recon, x).item(), "loss_latent": commitment.item(),
                      "loss_lpips": self.perceptual(x, recon).item()}
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value
            count += 1
            all_codes.append(codes.cpu())
        self.model.train()
        logs = {key: value / max(count, 1) for key, value in totals.items()}
        if all_codes:
            codes = all_gather_cat(torch.cat(all_codes).to(self.env.device)).cpu()  # usage over the whole split
            logs.update(self.model.codebook_usage(codes))
        return logs

    @torch.no_grad()
    def preview(self, batch: dict) -> torch.Tensor:
        self.model.eval()
        x = batch["image"].to(self.env.device)
        recon = self.model(x)[0].clamp(-1, 1)
        self.model.train()
        return torch.cat([x, recon]).cpu()

"""What training any tokenizer against a PatchGAN involves, whatever the tokenizer.

`GANTokenizerTask` is a TrainTask (common/trainer.py) for a tokenizer trained as VQGAN is. Each
step reconstructs the batch once, takes a generator step on

    reconstruction + perceptual_weight * LPIPS + factor * w * g(D(recon)) + the tokenizer's own terms,

w a fixed weight or VQGAN's adaptive weight times disc_weight, then a discriminator step on the
same detached reconstruction, its loss times factor (and LeCAM where configured). `factor` is
disc_factor from `disc_start` on and 0 before. Each network's gradient norm is clipped to its
optimizer section's `max_gn` where set. EMA copies of both networks follow where configured;
evaluation and previews use them. bf16 autocast on CUDA when `experiment.amp`.

A method subclass builds its tokenizer and discriminator from its own config section, says how
its loss terms are weighed (`GANObjective`) and implements what is its own: `regularization`
(its terms beyond reconstruction), `eval_forward` and, where disc_start does not count steps,
`gan_on`. The tokenizer's forward(x) returns (reconstruction, what `regularization` reads, ...).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.config import Field
from common.dist import DistEnv, all_reduce_mean, all_reduce_sum, is_distributed, sync_gradients
from common.ema import ModelEMA
from common.fsdp import fsdp_active, gathered, recompute_blocks, shard
from common.losses import (LPIPS, LeCAMRegularizer, NLayerDiscriminator, adaptive_generator_weight, hinge_d_loss,
                           hinge_g_loss)
from common.metrics import code_counts, usage_from_counts
from common.optim import build_optimizer, build_scheduler
from common.tokenizer import DISCRETE, Tokenizer
from common.trainer import Averages, Position

RECONSTRUCTION_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}

LPIPS_FIELDS = {
    "vgg_weights": Field(str, None, doc="local vgg16-397923af.pth for LPIPS (else the torch hub cache)"),
    "lpips_random_trunk": Field(bool, False, doc="tests only: LPIPS on an untrained VGG trunk"),
}


def discriminator_from_loss_section(loss: Mapping[str, Any]) -> NLayerDiscriminator:
    """The PatchGAN of a taming-style `loss` section (disc_in_channels, disc_ndf, disc_num_layers, use_actnorm)."""
    return NLayerDiscriminator(loss["disc_in_channels"], loss["disc_ndf"], loss["disc_num_layers"], loss["use_actnorm"])


def clip_gradients(network: nn.Module, max_norm: float | None) -> None:
    """Clip the network's gradient norm to the optimizer section's `max_gn` (None: leave it)."""
    if max_norm:
        nn.utils.clip_grad_norm_(network.parameters(), max_norm)


@dataclasses.dataclass(frozen=True)
class GANObjective:
    """How the terms of a GAN-trained tokenizer's two objectives are weighed."""

    reconstruction_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (recon, x) -> scalar
    perceptual_weight: float
    disc_start: int  # the first step (or epoch, see GANTokenizerTask.gan_on) with the GAN terms
    disc_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = hinge_d_loss  # (real, fake logits)
    gen_loss: Callable[[torch.Tensor], torch.Tensor] = hinge_g_loss  # (fake logits)
    disc_weight: float = 1.0  # multiplies the adaptive generator weight
    gen_loss_weight: float | None = None  # a fixed generator weight instead of the adaptive one
    disc_factor: float = 1.0  # multiplies both GAN terms from disc_start on
    disc_loss_weight: float = 1.0  # multiplies the discriminator's loss alone (the RQ-VAE's disc_weight)
    lecam_weight: float | None = None  # the discriminator's LeCAM regulariser; None: off
    reconstruction_weight: float = 1.0  # multiplies the reconstruction loss (LlamaGen's reconstruction_weight)


class GANTokenizerTask:
    """Subclasses implement `regularization` and `eval_forward` (see the module docstring)."""

    # Before disc_start both GAN terms are computed with weight 0, as in taming-transformers and its
    # descendants: the discriminator's BatchNorm statistics, its optimizer's step count and the LeCAM
    # averages move. False: the discriminator is left alone until disc_start.
    gan_terms_before_start = True

    def __init__(self, config: Mapping[str, Any], env: DistEnv, steps_per_epoch: int, model: Tokenizer,
                 discriminator: nn.Module, objective: GANObjective, disc_optimizer: Mapping[str, Any] | None = None,
                 disc_epochs: float | None = None, ema_decay: float | None = None, vgg_weights: str | None = None,
                 lpips_random_trunk: bool = False):
        """`disc_optimizer` defaults to the `optimizer` section, `disc_epochs` (the length of the
        discriminator's schedule) to `experiment.epochs`; `ema_decay` None keeps no averages."""
        self.env = env
        self.objective = objective
        self.amp = config["experiment"]["amp"] and env.device.type == "cuda"
        self.model = model.to(env.device)
        self.discriminator = discriminator.to(env.device)
        self.lpips = None
        if objective.perceptual_weight > 0:
            self.lpips = LPIPS(vgg_weights, random_trunk=lpips_random_trunk).to(env.device)
        self.lecam = LeCAMRegularizer() if objective.lecam_weight is not None else None
        experiment = config["experiment"]
        if experiment["grad_checkpointing"]:
            recompute_blocks(self.model)
        # FSDP shards the tokenizer (one unit unless it names repeated blocks); the small discriminator stays whole
        self.reshard_after_forward = experiment["fsdp_reshard_after_forward"]
        self.train_model = self.model
        if fsdp_active(experiment, env):
            shard(self.model, self.model, env, self.reshard_after_forward, self.amp)
        elif is_distributed():
            self.train_model = DistributedDataParallel(self.model)

        epochs = config["experiment"]["epochs"]
        optimizer = config["optimizer"]
        disc_optimizer = disc_optimizer or optimizer
        self.optimizer = build_optimizer(self.model.parameters(), optimizer)
        self.scheduler = build_scheduler(self.optimizer, optimizer, steps_per_epoch, epochs, env.world_size)
        self.disc_optimizer = build_optimizer(self.discriminator.parameters(), disc_optimizer)
        self.disc_scheduler = build_scheduler(self.disc_optimizer, disc_optimizer, steps_per_epoch,
                                              epochs if disc_epochs is None else disc_epochs, env.world_size)
        self.max_grad_norms = (optimizer.get("max_gn"), disc_optimizer.get("max_gn"))  # (generator, discriminator)
        self.ema_decay = ema_decay
        self.restart_ema()

    # ------------------------------------------------------------------------------------------
    # What a method supplies
    # ------------------------------------------------------------------------------------------

    def regularization(self, aux: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The tokenizer's own weighted loss terms, from the second output of its forward, and their logs."""
        raise NotImplementedError

    def eval_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None]:
        """In evaluation and previews: (reconstruction, the tokenizer's own scalars, its codes or None if
        continuous)."""
        raise NotImplementedError

    def gan_on(self, step: int, epoch: int) -> bool:
        """Whether the GAN terms are on at optimizer step `step` (0-based) of epoch `epoch`: here counted in steps."""
        return step >= self.objective.disc_start

    # ------------------------------------------------------------------------------------------
    # What every method shares
    # ------------------------------------------------------------------------------------------

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

    def gan_factor(self, step: int, epoch: int) -> float:
        return self.objective.disc_factor if self.gan_on(step, epoch) else 0.0

    def generator_weight(self, nll: torch.Tensor, loss_gen: torch.Tensor) -> torch.Tensor:
        """The fixed gen_loss_weight, else VQGAN's adaptive weight times disc_weight."""
        objective = self.objective
        if objective.gen_loss_weight is not None:
            return nll.new_tensor(objective.gen_loss_weight)
        return adaptive_generator_weight(nll, loss_gen, self.model.last_layer) * objective.disc_weight

    # ------------------------------------------------------------------------------------------
    # The two losses of a step
    # ------------------------------------------------------------------------------------------

    def generator_loss(self, x: torch.Tensor, recon: torch.Tensor, aux: Any, step: int,
                       epoch: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """The generator objective on a reconstruction (graph kept for the backward pass)."""
        objective = self.objective
        loss_recon = objective.reconstruction_loss(recon, x)
        loss_lpips = self.perceptual(x, recon)
        nll = objective.reconstruction_weight * loss_recon + objective.perceptual_weight * loss_lpips
        loss_gen = gen_weight = x.new_zeros(())
        if self.gan_terms_before_start or self.gan_on(step, epoch):
            with self.autocast():
                logits_fake = self.discriminator(recon)
            loss_gen = objective.gen_loss(logits_fake.float())
            gen_weight = self.generator_weight(nll, loss_gen)
        regularization, own_logs = self.regularization(aux, step)
        loss = nll + self.gan_factor(step, epoch) * gen_weight * loss_gen + regularization
        logs = {"loss_total": loss.item(), "loss_recon": loss_recon.item(), "loss_lpips": loss_lpips.item(),
                "loss_gen": loss_gen.item(), "gen_weight": gen_weight.item(), **own_logs}
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor, step: int,
                           epoch: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """The configured loss on real and detached fake, each in its own call (own BatchNorm statistics),
        plus the LeCAM regulariser."""
        with self.autocast():
            logits_real = self.discriminator(x).float()
            logits_fake = self.discriminator(recon.detach()).float()
        loss_adv = self.objective.disc_loss(logits_real, logits_fake)
        loss, lecam_logs = loss_adv, {}
        if self.lecam is not None:
            # The averages follow the global batch, so every rank holds the same state and a resume restores
            # it exactly (Open-MAGVIT2 keeps one per rank and never saves it).
            means = torch.stack([logits_real.detach().mean(), logits_fake.detach().mean()])
            all_reduce_mean(means)
            self.lecam.update(means[0], means[1])
            loss_lecam = self.lecam.loss(logits_real, logits_fake)
            loss = loss_adv + self.objective.lecam_weight * loss_lecam
            lecam_logs["loss_lecam"] = loss_lecam.item()
        loss = self.gan_factor(step, epoch) * self.objective.disc_loss_weight * loss
        logs = {"loss_disc": loss.item(), "loss_disc_adv": loss_adv.item(), **lecam_logs,
                "logits_real": logits_real.mean().item(), "logits_fake": logits_fake.mean().item()}
        return loss, logs

    # ------------------------------------------------------------------------------------------
    # The TrainTask interface
    # ------------------------------------------------------------------------------------------

    def train_step(self, batch: dict, position: Position) -> dict[str, float]:
        """Generator step, discriminator step, EMA updates."""
        x = batch["image"].to(self.env.device)
        step, epoch = position.step, position.epoch
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        with self.autocast():
            recon, aux = self.train_model(x)[:2]  # computed once: both steps see this reconstruction
        recon = recon.float()

        loss, logs = self.generator_loss(x, recon, aux, step, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(self.model, self.max_grad_norms[0])
        self.optimizer.step()
        self.scheduler.step()

        if self.gan_terms_before_start or self.gan_on(step, epoch):
            loss_disc, disc_logs = self.discriminator_loss(x, recon, step, epoch)
            self.disc_optimizer.zero_grad(set_to_none=True)  # drops what the generator step left on D
            loss_disc.backward()
            sync_gradients(self.discriminator)
            clip_gradients(self.discriminator, self.max_grad_norms[1])
            self.disc_optimizer.step()
            self.disc_scheduler.step()
            logs.update(disc_logs)

        if self.ema is not None:
            self.ema.update(self.model)
            self.disc_ema.update(self.discriminator)
        return {**logs, "lr": lr}

    @contextlib.contextmanager
    def eval_weights(self) -> Iterator[None]:
        """Both networks in eval mode with their EMA weights (when kept); training weights and mode come back."""
        with contextlib.ExitStack() as stack:
            if self.ema is not None:
                stack.enter_context(self.ema.swapped_in(self.model))
                stack.enter_context(self.disc_ema.swapped_in(self.discriminator))
            stack.enter_context(gathered(self.model, self.reshard_after_forward))
            self.model.eval()
            self.discriminator.eval()
            try:
                yield
            finally:
                self.model.train()
                self.discriminator.train()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        """Mean losses per batch, and the codebook usage of a discrete tokenizer over the whole split (all ranks)."""
        averages = Averages()
        discrete = self.model.kind == DISCRETE
        if discrete:  # every rank joins the sum, even one without batches
            counts = torch.zeros(self.model.code_depth, self.model.vocab_size, dtype=torch.long, device=self.env.device)
        with self.eval_weights(), self.autocast():
            for batch in batches:
                x = batch["image"].to(self.env.device)
                recon, own_logs, codes = self.eval_forward(x)
                recon = recon.float()
                logits_fake = self.discriminator(recon).float()
                averages.add({"loss_recon": self.objective.reconstruction_loss(recon, x).item(),
                              "loss_lpips": self.perceptual(x, recon).item(),
                              "loss_gen": self.objective.gen_loss(logits_fake).item(), **own_logs})
                if discrete:
                    depth_codes = codes if codes.ndim == 4 else codes.unsqueeze(-1)  # (B, h, w, D)
                    counts += torch.stack([code_counts(depth_codes[..., d], self.model.vocab_size)
                                           for d in range(depth_codes.shape[-1])])
        logs = averages.means()
        if discrete:
            logs.update(self.codebook_usage(all_reduce_sum(counts).cpu()))
        return logs

    def codebook_usage(self, counts: torch.Tensor) -> dict[str, float]:
        """Usage and perplexity from code counts (D, vocab_size); per depth (`usage_d0`, ...) for a code grid
        with depth."""
        if counts.sum() == 0:
            return {}
        if len(self.model.code_shape) < 3:
            return usage_from_counts(counts[0])
        return {f"{name}_d{d}": value for d, depth_counts in enumerate(counts)
                for name, value in usage_from_counts(depth_counts).items()}

    @torch.no_grad()
    def preview(self, batch: dict) -> torch.Tensor:
        x = batch["image"].to(self.env.device)
        with self.eval_weights(), self.autocast():
            recon = self.eval_forward(x)[0].float().clamp(-1, 1)
        return torch.cat([x, recon]).cpu()

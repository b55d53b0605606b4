"""What training any prior on a frozen tokenizer's tokens involves, whatever the prior.

`PriorTask` is a TrainTask (common/trainer.py) for a model with `loss(...) -> (loss, logs)` and
`generate(labels, **knobs)`: DDP around the loss, gradient accumulation up to the global batch, bf16
autocast on CUDA, gradient-norm clipping, the optimizer and scheduler steps, EMA of the weights
(used for evaluation and previews), the validation loss and a grid of samples. A method subclass
says how a batch becomes the loss's inputs and builds its optimizer and scheduler.

Tokens come from a batch of cached tokens (`codes`, or `moments` of a continuous tokenizer, of which
each step draws a fresh posterior sample) or of images encoded on the fly.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.config import Config
from common.dist import DistEnv, is_distributed
from common.ema import ModelEMA
from common.errors import ConfigError
from common.knobs import resolve_knobs
from common.trainer import Averages, Position


class LossModule(nn.Module):
    """A prior's `loss` behind `forward`, so that DDP, which synchronises what forward computes, can wrap it."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, *args, **kwargs):
        return self.prior.loss(*args, **kwargs)


def accumulation_steps(config: Config, world_size: int) -> int:
    """Micro-batches per optimizer step: enough to reach `experiment.total_batch_size`, or the official
    RQ-VAE `optimizer.grad_accm_steps` (the two must agree when both are given); 1 without either."""
    experiment, per_step = config["experiment"], config["experiment"]["batch_size"] * world_size
    given = config["optimizer"]["grad_accm_steps"]
    total = experiment["total_batch_size"]
    if total and given > 1 and total != per_step * given:
        raise ConfigError(f"experiment.total_batch_size {total} and optimizer.grad_accm_steps {given} disagree: "
                          f"{experiment['batch_size']} x {world_size} process(es) x {given} = {per_step * given}; "
                          "set one of them")
    return max(1, (total or per_step * given) // per_step)


class PriorTask:
    """Subclasses set `optimizer` and `scheduler` and implement `loss_inputs`."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def __init__(self, config: Config, env: DistEnv, tokenizer: nn.Module, model: nn.Module,
                 ema_decay: float | None, max_grad_norm: float | None, preview_knobs: dict[str, Any],
                 ema_warmup: str = "none"):
        self.env = env
        self.config = config
        self.tokenizer = tokenizer.to(env.device).eval().requires_grad_(False)
        self.model = model
        self.train_loss = LossModule(self.model)
        if is_distributed():
            self.train_loss = DistributedDataParallel(self.train_loss)
        # after DDP has broadcast rank 0's weights: every rank averages the same model
        self.ema = ModelEMA(model, ema_decay, ema_warmup) if ema_decay else None
        experiment = config["experiment"]
        self.accumulation = accumulation_steps(config, env.world_size)
        self.max_grad_norm = max_grad_norm
        self.autocast_dtype = torch.bfloat16 if experiment["amp"] and env.device.type == "cuda" else None
        self.micro_step = 0
        self.preview_knobs = resolve_knobs(model.SAMPLING_KNOBS, {}, preview_knobs, getattr(model, "code_depth", 1))

    def loss_inputs(self, batch: dict, position: Position | None) -> tuple[tuple, dict]:
        """(args, kwargs) of the model's loss for a batch; position is None in evaluation."""
        raise NotImplementedError

    def extra_logs(self, position: Position) -> dict[str, float]:
        """Scalars of the method's own to log with each training step."""
        return {}

    def state_objects(self) -> dict[str, Any]:
        objects = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}
        if self.ema is not None:
            objects["ema"] = self.ema
        return objects

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def labels(self, batch: dict) -> torch.Tensor:
        return batch["label"].to(self.env.device)

    @torch.no_grad()
    def encode(self, batch: dict) -> torch.Tensor:
        """The batch's tokens: cached codes as they are, a posterior sample of cached moments, or its images
        encoded by the tokenizer."""
        if "codes" in batch:
            return batch["codes"].to(self.env.device)
        if "moments" in batch:
            return self.tokenizer.tokens_from_moments(batch["moments"].to(self.env.device))
        return self.tokenizer.encode_tokens(batch["image"].to(self.env.device))

    def train_step(self, batch: dict, position: Position) -> dict[str, float]:
        args, kwargs = self.loss_inputs(batch, position)
        self.micro_step += 1
        update = self.micro_step % self.accumulation == 0
        sync = contextlib.nullcontext() if update or not is_distributed() else self.train_loss.no_sync()
        with sync:
            with self.autocast():
                loss, logs = self.train_loss(*args, **kwargs)
            (loss / self.accumulation).backward()
        logs["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        logs.update(self.extra_logs(position))
        if update:
            if self.max_grad_norm:
                logs["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
        return logs

    def eval_model(self) -> contextlib.AbstractContextManager:
        return self.ema.swapped_in(self.model) if self.ema is not None else contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        averages = Averages()
        self.model.eval()
        with self.eval_model():
            for batch in batches:
                args, kwargs = self.loss_inputs(batch, None)
                with self.autocast():
                    _, logs = self.model.loss(*args, **kwargs)
                averages.add(logs)
        self.model.train()
        return averages.means(prefix="val_")

    @torch.no_grad()
    def preview(self, batch: dict) -> torch.Tensor:
        """One sample per class (the first ten classes; eight of an unconditional prior)."""
        classes = self.model.num_classes
        labels = torch.arange(min(10, classes) if classes > 1 else 8, device=self.env.device) % classes
        self.model.eval()
        with self.eval_model(), self.autocast():
            tokens = self.model.generate(labels, **self.preview_knobs)
        self.model.train()
        return self.tokenizer.decode_tokens(tokens).clamp(-1, 1).float().cpu()

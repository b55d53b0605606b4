"""What training any prior on a frozen tokenizer's tokens involves, whatever the prior.

`PriorTask` is a TrainTask (common/trainer.py) for a model with `loss(...) -> (loss, logs)` and
`generate(labels, **knobs)`: DDP around the loss (or FSDP, `experiment.fsdp`), activation checkpointing per block
(`experiment.grad_checkpointing`), gradient accumulation up to the global batch, bf16 autocast on CUDA,
gradient-norm clipping, the optimizer and scheduler steps, EMA of the weights
(used for evaluation and previews), the validation loss and a grid of samples. A method subclass
says how a batch becomes the loss's inputs and builds its optimizer and scheduler.

Tokens come from a batch of cached tokens (`codes`, or `moments` of a continuous tokenizer, of which
each step draws a fresh posterior sample) or of images encoded on the fly.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.code_view import arrange_codes, view_for
from common.config import Config
from common.dist import DistEnv, is_distributed
from common.ema import ModelEMA
from common.errors import ConfigError
from common.fsdp import fsdp_active, gathered, recompute_blocks, shard, whole
from common.knobs import resolve_knobs
from common.trainer import Averages, Position


class LossModule(nn.Module):
    """A prior's `loss` behind `forward`, so that DDP, which synchronises what forward computes, can wrap it, and
    FSDP, which gathers the weights around forward, can shard it (its `generate` is gathered the same way)."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, *args, **kwargs):
        return self.prior.loss(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.prior.generate(*args, **kwargs)


def accumulation_steps(config: Config, world_size: int) -> int:
    """Micro-batches per optimizer step: enough to reach `experiment.total_batch_size`, or the official
    RQ-VAE `optimizer.grad_accm_steps` (the two must agree when both are given); 1 without either."""
    experiment, per_step = config["experiment"], config["experiment"]["batch_size"] * world_size
    given = config["optimizer"]["grad_accm_steps"]
    total = experiment["total_batch_size"]
    if total and total % per_step:
        raise ConfigError(f"experiment.total_batch_size {total} is not a multiple of experiment.batch_size "
                          f"{experiment['batch_size']} x {world_size} process(es) = {per_step}; choose a global batch "
                          "that the processes divide, or another per-process batch")
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
        # the prior's codes may be another layout of the tokenizer's (common/code_view.py)
        self.tokenizer = view_for(tokenizer, model).to(env.device).eval().requires_grad_(False)
        self.model = model
        experiment = config["experiment"]
        if experiment["grad_checkpointing"]:
            recompute_blocks(model)
        # evaluation and previews call loss_module: the FSDP root (whose hooks gather the weights) or the bare loss
        self.loss_module = self.train_loss = LossModule(self.model)
        self.sharded = fsdp_active(experiment, env)
        self.reshard_after_forward = experiment["fsdp_reshard_after_forward"]
        if self.sharded:
            shard(self.loss_module, model, env, self.reshard_after_forward, experiment["amp"], ("generate",))
        elif is_distributed():
            self.train_loss = DistributedDataParallel(self.loss_module)
        # after DDP or FSDP has given every rank rank 0's weights: every rank averages the same model
        self.ema = ModelEMA(model, ema_decay, ema_warmup) if ema_decay else None
        self.accumulation = accumulation_steps(config, env.world_size)
        if experiment["save_every_steps"] and experiment["save_every_steps"] % self.accumulation:
            raise ConfigError(f"experiment.save_every_steps {experiment['save_every_steps']} must be a multiple of the "
                              f"{self.accumulation} micro-batches of one optimizer step, so that a resumed run loses "
                              "no accumulated gradients")
        self.max_grad_norm = max_grad_norm
        self.autocast_dtype = torch.bfloat16 if experiment["amp"] and env.device.type == "cuda" else None
        self.micro_step: int | None = None  # micro-batches trained, counted from the first step's position
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
        """The batch's tokens in the prior's layout: cached codes (rearranged where the prior sees the tokenizer
        through a CodeView), a posterior sample of cached moments, or its images encoded by the tokenizer."""
        if "codes" in batch:
            return arrange_codes(self.tokenizer, batch["codes"].to(self.env.device))
        if "moments" in batch:
            return self.tokenizer.tokens_from_moments(batch["moments"].to(self.env.device))
        return self.tokenizer.encode_tokens(batch["image"].to(self.env.device))

    def train_step(self, batch: dict, position: Position) -> dict[str, float]:
        args, kwargs = self.loss_inputs(batch, position)
        if self.micro_step is None:  # the batches done before: a resumed run keeps the rhythm of its updates
            self.micro_step = position.step
        self.micro_step += 1
        update = self.micro_step % self.accumulation == 0
        # FSDP reduces every micro-batch's gradients into their shards: no whole gradients kept across micro-batches
        accumulating = not update and isinstance(self.train_loss, DistributedDataParallel)
        sync = self.train_loss.no_sync() if accumulating else contextlib.nullcontext()
        with sync:
            with self.autocast():
                loss, logs = self.train_loss(*args, **kwargs)
            (loss / self.accumulation).backward()
        logs["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        logs.update(self.extra_logs(position))
        if update:
            if self.max_grad_norm:
                logs["grad_norm"] = whole(nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
        return logs

    @contextlib.contextmanager
    def eval_model(self) -> Iterator[None]:
        """The EMA weights swapped in (when kept), gathered whole under FSDP."""
        with contextlib.ExitStack() as stack:
            if self.ema is not None:
                stack.enter_context(self.ema.swapped_in(self.model))
            stack.enter_context(gathered(self.loss_module, self.reshard_after_forward))
            yield

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        averages = Averages()
        self.model.eval()
        with self.eval_model():
            for batch in batches:
                args, kwargs = self.loss_inputs(batch, None)
                with self.autocast():
                    _, logs = self.loss_module(*args, **kwargs)
                averages.add(logs)
        self.model.train()
        return averages.means(prefix="val_")

    @torch.no_grad()
    def preview_conditions(self, batch: dict) -> torch.Tensor:
        """The conditions of the preview grid: one per class (the first ten classes; eight of an unconditional
        prior). `batch` holds the first validation items, for priors conditioned on what they hold."""
        classes = self.model.num_classes
        return torch.arange(min(10, classes) if classes > 1 else 8, device=self.env.device) % classes

    def preview(self, batch: dict) -> torch.Tensor:
        """One sample per condition of `preview_conditions`."""
        conditions = self.preview_conditions(batch)
        self.model.eval()
        with self.eval_model(), self.autocast():
            tokens = self.loss_module.generate(conditions, **self.preview_knobs)
        self.model.train()
        return self.tokenizer.decode_tokens(tokens).clamp(-1, 1).float().cpu()

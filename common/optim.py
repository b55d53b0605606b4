"""Optimizers and learning-rate schedules, configured as in the official repositories.

The schedule is a closed-form multiplier of the base learning rate per optimizer step
(a `LambdaLR`), so its state is just the step count and resumes exactly.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch.optim.lr_scheduler import LambdaLR

from common.config import Field

OPTIMIZER_SCHEMA = {
    "type": Field(str, "adamW", choices=("adam", "adamW", "sgd")),
    "init_lr": Field(float),
    "weight_decay": Field(float, 0.0),
    "betas": Field(list, [0.9, 0.999], items=float),
    "eps": Field(float, 1e-8),
    "max_gn": Field(float, None, doc="gradient-norm clip; null = none"),
    "grad_accm_steps": Field(int, 1, doc="priors: micro-batches per optimizer step (as experiment.total_batch_size); "
                                         "tokenizers: must be 1", minimum=1),
    "lr_drop_epoch": Field(list, None, items=int, doc="step decay: the lr is multiplied by lr_drop_rate after "
                                                       "each of these epochs (1-based; Open-MAGVIT2)", minimum=1),
    "lr_drop_rate": Field(float, 0.1),
    "warmup": {
        "epoch": Field(float, 0.0),
        "multiplier": Field(float, 1.0),
        "buffer_epoch": Field(float, 0.0),
        "min_lr": Field(float, 0.0),
        "mode": Field(str, "fix", choices=("fix", "linear", "sqrt", "none")),
        "start_from_zero": Field(bool, None, doc="default: true when warmup.epoch > 0"),
        "decay": Field(str, "cosine", choices=("cosine", "constant"), doc="after warm-up: cosine to min_lr, or constant"),
    },
}


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Mapping,
                    no_decay: Iterable[torch.nn.Parameter] = ()) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD (momentum 0.9) from an `optimizer` config section; the parameters listed in
    `no_decay` (e.g. norm weights) form a second group without weight decay."""
    excluded = {id(p) for p in no_decay}
    decayed = [p for p in params if p.requires_grad and id(p) not in excluded]
    params = [{"params": decayed}]
    if excluded:
        params.append({"params": [p for p in no_decay if p.requires_grad], "weight_decay": 0.0})
    if cfg["type"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["init_lr"], momentum=0.9, weight_decay=cfg["weight_decay"])
    optimizer_class = torch.optim.Adam if cfg["type"] == "adam" else torch.optim.AdamW
    return optimizer_class(params, lr=cfg["init_lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"],
                           weight_decay=cfg["weight_decay"])


def peak_multiplier(warmup: Mapping, world_size: int) -> float:
    """The official warm-up modes: the peak lr is base * m, m possibly scaled by the world size."""
    m = warmup["multiplier"]
    return {"fix": max(1.0, m), "linear": max(1.0, m * world_size),
            "sqrt": max(1.0, m * math.sqrt(world_size)), "none": m}[warmup["mode"]]


def lr_multiplier(step: int, warmup: Mapping, base_lr: float, steps_per_epoch: int, epochs: float,
                  world_size: int = 1) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): warm-up, constant buffer, then decay."""
    peak = peak_multiplier(warmup, world_size)
    warmup_steps = warmup["epoch"] * steps_per_epoch
    buffer_steps = warmup["buffer_epoch"] * steps_per_epoch
    from_zero = warmup["start_from_zero"] if warmup["start_from_zero"] is not None else warmup["epoch"] > 0
    if warmup_steps > 0 and step < warmup_steps:
        progress = step / warmup_steps
        return peak * progress if from_zero else 1.0 + (peak - 1.0) * progress
    if step < warmup_steps + buffer_steps or warmup.get("decay", "cosine") == "constant":
        return peak
    decay_steps = max(1.0, (epochs * steps_per_epoch) - warmup_steps - buffer_steps)
    progress = min(1.0, (step - warmup_steps - buffer_steps) / decay_steps)
    floor = warmup["min_lr"] / base_lr if base_lr > 0 else 0.0
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_decay(step: int, drop_epochs: Iterable[int], rate: float, steps_per_epoch: int) -> float:
    """`rate` to the power of the drops passed: a drop after epoch e (1-based) acts from step e * steps_per_epoch."""
    return rate ** sum(step >= epoch * steps_per_epoch for epoch in drop_epochs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping, steps_per_epoch: int, epochs: float,
                    world_size: int = 1) -> LambdaLR:
    """A per-step scheduler for an `optimizer` config section (see `lr_multiplier` and `step_decay`)."""
    warmup = dict(cfg["warmup"])
    base_lr = cfg["init_lr"]
    drops, rate = tuple(cfg.get("lr_drop_epoch") or ()), cfg.get("lr_drop_rate", 0.1)
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, warmup, base_lr, steps_per_epoch, epochs, world_size)
                    * step_decay(step, drops, rate, steps_per_epoch))

"""Exponential moving average of a model's weights, one class for every method.

Trainable float parameters are averaged, shadow <- d * shadow + (1 - d) * param; buffers
(BatchNorm statistics, EMA codebooks) and frozen parameters are copied as they are. The
shadow has the same keys as `model.state_dict()`, so it loads into the model directly. Under
FSDP the shadow of a sharded parameter is a DTensor sharded as the parameter is (each rank
averages its own shard); a full state loads into it (common/fsdp.py).

Decay per method: MAR 0.9999 and Open-MAGVIT2 0.999, both constant (`warmup="none"`);
RQ-Transformer 0.999 with `warmup="rqvae"`: update n (0-based) uses
min(decay, (1 + n) / (10 + n)), so the first update keeps only 10% of the initial copy.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from common.errors import CheckpointError, ConfigError
from common.fsdp import shard_like

WARMUPS = ("none", "rqvae")


def _bare(model: nn.Module) -> nn.Module:
    """The model inside a DDP / DataParallel wrapper (its state-dict keys have no `module.` prefix)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


class ModelEMA:
    """Shadow copy of a model's parameters and buffers, updated after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float, warmup: str = "none"):
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1], got {decay}")
        if warmup not in WARMUPS:
            raise ConfigError(f"EMA warmup must be one of {', '.join(WARMUPS)}, got {warmup!r}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        model = _bare(model)
        self.shadow = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        self.averaged = {name for name, tensor in model.state_dict(keep_vars=True).items()
                         if isinstance(tensor, nn.Parameter) and tensor.requires_grad and tensor.is_floating_point()}

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if self.warmup == "rqvae":
            return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for name, tensor in _bare(model).state_dict().items():
            if name in self.averaged:
                self.shadow[name].mul_(decay).add_(tensor, alpha=1.0 - decay)
            else:
                self.shadow[name].copy_(tensor)
        self.num_updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's weights with the EMA weights."""
        _bare(model).load_state_dict(self.shadow)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the block with the EMA weights in `model`; its own weights come back afterwards."""
        model = _bare(model)
        raw = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(raw)

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        missing = sorted(set(self.shadow) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.shadow))
        mismatched = [k for k in self.shadow if k in shadow and shadow[k].shape != self.shadow[k].shape]
        if missing or unexpected or mismatched:
            raise CheckpointError(f"EMA weights do not fit the model: missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]}, mis-shaped {mismatched[:4]}")
        for name, tensor in shadow.items():
            self.shadow[name].copy_(shard_like(self.shadow[name], tensor))
        self.num_updates = int(state["num_updates"])

"""Training LlamaGen's GPT by next-patch prediction on the codes of a frozen tokenizer.

As the official `train_c2i.py` does it: the patch size of each epoch from `npp.patch_level` and
`npp.epoch_rate` (coarse patches first, token level last), AdamW with weight decay on the
matrices and embeddings only, gradient clipping, class dropout for guidance, bf16 on CUDA, and
with `npp.scheduler` the learning rate restarting its warm-up and decay in every stage. Codes come
from extracted shards (`codes.train`) or from images encoded on the fly by any tokenizer whose
codes are a square grid (LlamaGen's VQ-16, Open-MAGVIT2, ...).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from common.codes import CODES_SCHEMA
from common.config import ANY, Config, Field
from common.data import DATASET_SCHEMA
from common.dist import DistEnv
from common.ema import ModelEMA
from common.errors import ConfigError
from common.optim import OPTIMIZER_SCHEMA, build_optimizer
from common.prior_task import PriorTask
from common.trainer import EXPERIMENT_SCHEMA, Position
from npp.gpt import GPT
from npp.schedule import patch_plan, patch_side, segment_lr_multiplier
from npp.schema import GPT_ARCH

NPP_SCHEMA = {
    "dataset": DATASET_SCHEMA,
    "codes": CODES_SCHEMA,
    "vqvae": {"ckpt": Field(str, None, doc="the tokenizer checkpoint (ours or official) whose codes are modelled"),
              "*": ANY},
    "arch": GPT_ARCH,
    "npp": {
        "patch_level": Field(int, 2, doc="stages K: patches of 4 then 1 tokens (2), 16-4-1 (3), 64-16-4-1 (4)"),
        "epoch_rate": Field(float, 0.5, doc="stage i ends at epoch int(epochs * epoch_rate^(K-1-i))"),
        "scheduler": Field(bool, False, doc="per-stage warm-up and linear decay; false: constant lr"),
        "warmup_epochs": Field(float, 1.0),
        "decay_ratio": Field(float, 0.2, doc="share of each stage spent decaying to end_lr"),
        "end_lr": Field(float, 1e-5),
        "ema": Field(float, None, doc="EMA decay of the weights (official --ema: 0.9999); null: none"),
    },
    "optimizer": OPTIMIZER_SCHEMA,
    "experiment": EXPERIMENT_SCHEMA,
    "seed": Field(int, 0),
}


def resolve_gpt_arch(config: Mapping[str, Any], tokenizer: nn.Module, source: str) -> Config:
    """Fill the vocabulary and the number of codes per image (at the dataset's resolution) from the
    tokenizer, and check they fit it."""
    shape = tuple(tokenizer.code_shape)
    if len(shape) != 2:
        raise ConfigError(f"{source}: the GPT models a square grid of codes (B, h, w); the tokenizer makes codes of "
                          f"shape {list(shape)}; use a tokenizer without code depth (LlamaGen VQ, Open-MAGVIT2)")
    resolution = config["dataset"]["resolution"]
    side = resolution // tokenizer.downsample_factor if resolution else shape[0]
    arch = dict(config["arch"])
    found = {"vocab_size": tokenizer.vocab_size, "image_tokens": side * side}
    for key, value in found.items():
        if arch[key] is None:
            arch[key] = value
        elif arch[key] != value:
            raise ConfigError(f"{source}: arch.{key} {arch[key]} does not match the tokenizer's {value}")
    return Config(arch)


class NPPStage2Task(PriorTask):
    """The TrainTask of next-patch prediction (see common/prior_task.py)."""

    def __init__(self, config: Config, env: DistEnv, steps_per_epoch: int, tokenizer: nn.Module):
        model = GPT.from_config(config["arch"]).to(env.device)
        npp = config["npp"]
        ema = ModelEMA(model, npp["ema"]) if npp["ema"] else None
        super().__init__(config, env, tokenizer, model, ema, config["optimizer"]["max_gn"])
        self.plan = patch_plan(config["experiment"]["epochs"], npp["patch_level"], npp["epoch_rate"])
        for size in self.plan[0]:
            if self.model.grid % math.isqrt(size):
                raise ConfigError(f"npp.patch_level {npp['patch_level']}: patches of {size} codes do not tile the "
                                  f"{self.model.grid}x{self.model.grid} code grid; lower it")
        norms = [p for p in self.model.parameters() if p.ndim < 2]  # officially: no decay on 1-D weights
        self.optimizer = build_optimizer(self.model.parameters(), config["optimizer"], no_decay=norms)
        updates_per_epoch = max(1, steps_per_epoch // self.accumulation)
        base_lr = config["optimizer"]["init_lr"]
        if npp["scheduler"]:
            self.scheduler = LambdaLR(self.optimizer, lambda step: segment_lr_multiplier(
                step, updates_per_epoch, self.plan, npp["warmup_epochs"], npp["decay_ratio"], base_lr, npp["end_lr"]))
        else:
            self.scheduler = LambdaLR(self.optimizer, lambda step: 1.0)

    def loss_inputs(self, batch: dict, position: Position | None) -> tuple[tuple, dict]:
        side = patch_side(position.epoch, self.plan) if position is not None else 1  # evaluation: token level
        return (self.encode(batch), self.labels(batch)), {"patch_side": side}

    def train_step(self, batch: dict, position: Position) -> dict[str, float]:
        logs = super().train_step(batch, position)
        logs["patch_size"] = patch_side(position.epoch, self.plan) ** 2
        return logs

    def sample_codes(self, labels: torch.Tensor) -> torch.Tensor:
        sample = self.config["experiment"]["sample"] or {}
        return self.model.generate(labels, cfg_scale=sample.get("cfg_scale", 1.0),
                                   temperature=sample.get("temperature", 1.0), top_k=sample.get("top_k"),
                                   top_p=sample.get("top_p"))

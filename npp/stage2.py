"""Training LlamaGen's GPT by next-patch prediction on the codes of a frozen tokenizer.

As the official `train_c2i.py` does it: the patch size of each epoch from `npp.patch_level` and
`npp.epoch_rate` (coarse patches first, token level last), AdamW with weight decay on the
matrices and embeddings only, gradient clipping, class dropout for guidance, bf16 on CUDA, and
with `npp.scheduler` the learning rate restarting its warm-up and decay in every stage. Codes come
from extracted shards (`codes.train`) or from images encoded on the fly by any discrete tokenizer:
a square grid of codes (LlamaGen's VQ-16, Open-MAGVIT2), or residual codes (h, w, D) of an RQ-VAE
with D = s * s, folded into the (h s, w s) grid whose s x s blocks hold one position's codes in
depth order (common/code_view.py); the patch stages then take whole positions.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from common.code_view import CodeView, folded
from common.token_cache import CODES_SCHEMA, TOKENIZER_SCHEMA
from common.config import ANY, Config, Field
from common.data import DATASET_SCHEMA
from common.dist import DistEnv
from common.errors import CheckpointError, ConfigError
from common.optim import OPTIMIZER_SCHEMA, build_optimizer
from common.prior_task import PriorTask
from common.tokenizer import DISCRETE
from common.trainer import EXPERIMENT_SCHEMA, Position
from npp.gpt import GPT
from npp.schedule import patch_plan, patch_side, segment_lr_multiplier
from npp.schema import GPT_ARCH

NPP_SCHEMA = {
    "dataset": DATASET_SCHEMA,
    "codes": CODES_SCHEMA,
    "tokenizer": TOKENIZER_SCHEMA,
    "vqvae": {"ckpt": Field(str, None, doc="the tokenizer checkpoint (ours or official) whose codes are modelled"),
              "*": ANY},
    "arch": GPT_ARCH,
    "npp": {
        "patch_level": Field(int, 2, minimum=1,
                             doc="stages K: patches of 4 then 1 tokens (2), 16-4-1 (3), 64-16-4-1 (4)"),
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


def square_grid(tokenizer: nn.Module) -> tuple[int, int] | None:
    """The GPT's code grid on this tokenizer's codes: (h, w), or residual codes (h, w, D) folded into (h s, w s)
    for D = s * s (common/code_view.py); None when they make no square grid."""
    grid = folded(tokenizer.token_shape) if tokenizer.kind == DISCRETE else None
    return grid if grid is not None and grid[0] == grid[1] else None


def no_square_grid(tokenizer: nn.Module) -> str:
    """Why the GPT cannot model this tokenizer's tokens."""
    shape = tuple(tokenizer.token_shape)
    unfoldable = tokenizer.kind == DISCRETE and folded(shape) is None
    return (f"the GPT models a square grid of codes, and the stage-1 model given makes {tokenizer.kind} tokens of "
            f"shape {list(shape)}" + ("; residual codes fold into a grid only when their depth is a square "
                                      "(1, 4, 9, ...)" if unfoldable else ""))


def prepare(config: Config, tokenizer: nn.Module, source: str) -> Config:
    """The arch section with the vocabulary and the number of codes per image (at the dataset's resolution)
    filled from the tokenizer, and checked against it."""
    grid = square_grid(tokenizer)
    if grid is None:
        raise ConfigError(f"{source}: {no_square_grid(tokenizer)}")
    side = grid[0]
    resolution = config["dataset"]["resolution"]
    if resolution:  # the tokenizer's grid at the training resolution, times the side its depth folds into
        side = resolution // tokenizer.downsample_factor * (side // tokenizer.code_shape[0])
    arch = dict(config["arch"])
    found = {"vocab_size": tokenizer.vocab_size, "image_tokens": side * side}
    for key, value in found.items():
        if arch[key] is None:
            arch[key] = value
        elif arch[key] != value:
            raise ConfigError(f"{source}: arch.{key} {arch[key]} does not match the tokenizer's {value} (-v); leave "
                              f"arch.{key} null to take the tokenizer's")
    config["arch"] = Config(arch)
    return config


def check_tokenizer(prior: GPT, tokenizer: nn.Module, path: str, config: Mapping[str, Any]) -> None:
    """The GPT has token tables of its own: the tokenizer must make codes of a square grid (at whatever image size)
    and of its vocabulary."""
    if square_grid(tokenizer) is None:
        raise CheckpointError(f"{path}: {no_square_grid(tokenizer)}; pass the tokenizer it was trained with")
    if tokenizer.vocab_size != prior.vocab_size:
        raise CheckpointError(f"{path}: the GPT models codes of a {prior.vocab_size}-entry codebook; the given "
                              f"stage-1 model makes codes from {tokenizer.vocab_size} entries; pass the tokenizer it "
                              "was trained with")


def sampling_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs of the training config's `experiment.sample` (what the training previews use)."""
    return dict((config.get("experiment") or {}).get("sample") or {})


class NPPStage2Task(PriorTask):
    """The TrainTask of next-patch prediction (see common/prior_task.py)."""

    def __init__(self, config: Config, env: DistEnv, steps_per_epoch: int, tokenizer: nn.Module):
        model = GPT.from_config(config["arch"]).to(env.device)
        npp = config["npp"]
        super().__init__(config, env, tokenizer, model, npp["ema"], config["optimizer"]["max_gn"],
                         sampling_defaults(config))
        self.plan = patch_plan(config["experiment"]["epochs"], npp["patch_level"], npp["epoch_rate"])
        fold = self.tokenizer.fold if isinstance(self.tokenizer, CodeView) else 1  # residual codes: s x s blocks
        for size in self.plan[0]:
            side = math.isqrt(size)
            self.model.check_patch_side(side, f"npp.patch_level {npp['patch_level']} (lower it): ")
            if side > 1 and side % fold:
                raise ConfigError(f"npp.patch_level {npp['patch_level']}: patches of side {side} cut through the "
                                  f"{fold}x{fold} blocks of one position's residual codes; lower npp.patch_level")
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

    def extra_logs(self, position: Position) -> dict[str, float]:
        return {"patch_size": patch_side(position.epoch, self.plan) ** 2}

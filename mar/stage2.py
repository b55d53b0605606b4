"""Training MAR on the latents of a frozen continuous tokenizer (the KL-16 VAE), with the official recipe.

As the official `main_mar.py` / `engine_mar.py` train it: AdamW (0.9, 0.95) in two groups, no weight
decay on 1-D tensors, biases and every DiffLoss parameter, `optimizer.weight_decay` (0.02) on the
rest (position embeddings, mask token, fake latent and class table included); the learning rate
set before every iteration from the fractional epoch (linear warm-up, then constant or a half
cosine down to `min_lr`), peak blr x global batch / 256 unless `mar.lr` is given; gradients clipped
to a global norm of 3.0; an EMA of the weights (0.9999) from the first step, without warm-up. Ours
on top: bf16 autocast on CUDA (officially fp16 with a loss scaler) and gradient accumulation.

Each step trains on a fresh posterior sample of the latents: images encoded on the fly, token
shards of scripts/extract_codes.py (`codes.train`), or the official latent cache
(`cache.cached_path`, read by main_mar.py).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from common.checkpoint import strict_load
from common.config import ANY, Config, Field
from common.data import DATASET_SCHEMA
from common.dist import DistEnv
from common.errors import CheckpointError, ConfigError
from common.prior_task import PriorTask, accumulation_steps
from common.token_cache import CODES_SCHEMA, TOKENIZER_SCHEMA
from common.trainer import EXPERIMENT_SCHEMA, Position
from mar.model import MAR
from mar.official import official_mar_state
from mar.schema import MAR_ARCH

# What the tokenizer decides is left null and filled in by `prepare`.
FROM_TOKENIZER = {
    "img_size": Field(int, None, doc="image size (null: the dataset's resolution, else the tokenizer's)"),
    "vae_stride": Field(int, None, doc="image pixels per latent pixel (null: the tokenizer's downsampling)"),
    "vae_embed_dim": Field(int, None, doc="latent channels (null: the tokenizer's)"),
}

MAR_SCHEMA = {
    "dataset": DATASET_SCHEMA,
    "codes": CODES_SCHEMA,
    "tokenizer": TOKENIZER_SCHEMA,
    # main_stage2.py writes the tokenizer path here too (the RQ-Transformer configs' spelling)
    "vqvae": {"ckpt": Field(str, None, doc="same as tokenizer.ckpt"), "*": ANY},
    "cache": {
        "cached_path": Field(str, None, doc="the official latent cache (<class>/<file>.npz with moments and "
                                            "moments_flip) to train on instead of images; read by main_mar.py"),
    },
    "arch": {**MAR_ARCH, **FROM_TOKENIZER},
    "mar": {
        "ema_rate": Field(float, 0.9999, doc="EMA decay, constant from the first step", minimum=0),
        "blr": Field(float, 1e-4, doc="base learning rate: lr = blr x global batch / 256", minimum=0),
        "lr": Field(float, None, doc="absolute learning rate (null: from blr)", minimum=0),
        "min_lr": Field(float, 0.0, doc="where the cosine schedule ends", minimum=0),
        "lr_schedule": Field(str, "constant", choices=("constant", "cosine"), doc="after the warm-up"),
        "warmup_epochs": Field(float, 100.0, doc="linear warm-up from 0, per iteration", minimum=0),
        "grad_clip": Field(float, 3.0, doc="global gradient-norm clip (0: none)", minimum=0),
    },
    "optimizer": {
        "weight_decay": Field(float, 0.02, doc="AdamW decay of the matrices and embeddings", minimum=0),
        "betas": Field(list, [0.9, 0.95], items=float),
        "eps": Field(float, 1e-8),
        "grad_accm_steps": Field(int, 1, doc="micro-batches per optimizer step (as experiment.total_batch_size)",
                                 minimum=1),
    },
    "experiment": EXPERIMENT_SCHEMA,
    "seed": Field(int, 1),
}


# ----------------------------------------------------------------------------------------------
# The registry hooks: config against tokenizer, sampling defaults
# ----------------------------------------------------------------------------------------------

def prepare(config: Config, tokenizer: nn.Module, source: str) -> Config:
    """The arch section with the latent channels, stride and image size filled from the tokenizer (and the
    dataset's resolution), and checked against it."""
    if tokenizer.kind != "continuous":
        raise ConfigError(f"{source}: MAR models continuous latents, and the stage-1 model given makes "
                          f"{tokenizer.kind} codes of shape {list(tokenizer.token_shape)}; use a KL VAE (kl-vae)")
    if config["codes"]["train"] and config["cache"]["cached_path"]:
        raise ConfigError(f"{source}: codes.train and cache.cached_path are both set; train on one of them")
    arch, dataset = dict(config["arch"]), dict(config["dataset"])
    found = {"vae_embed_dim": (tokenizer.channels, "latent channels"),
             "vae_stride": (tokenizer.downsample_factor, "downsampling")}
    for key, (value, what) in found.items():
        if arch[key] is None:
            arch[key] = value
        elif arch[key] != value:
            raise ConfigError(f"{source}: arch.{key} (--{key}) is {arch[key]}, but the tokenizer's {what} is "
                              f"{value}")
    size = arch["img_size"] or dataset["resolution"] or tokenizer.resolution
    if dataset["resolution"] not in (None, size):
        raise ConfigError(f"{source}: arch.img_size {size} and dataset.resolution {dataset['resolution']} differ; "
                          "set one of them")
    arch["img_size"] = dataset["resolution"] = size
    config["arch"], config["dataset"] = Config(arch), Config(dataset)
    return config


def check_tokenizer(prior: MAR, tokenizer: nn.Module, path: str, config: Mapping[str, Any]) -> None:
    """MAR's token projections fix the latent channels, and its grid the stride: the VAE must have both."""
    stride = (config.get("arch") or {}).get("vae_stride")
    channels = getattr(tokenizer, "channels", None)
    if tokenizer.kind != "continuous" or channels != prior.vae_embed_dim or (
            stride and tokenizer.downsample_factor != stride):
        made = (f"latents of {channels} channels at stride {tokenizer.downsample_factor}"
                if tokenizer.kind == "continuous" else f"discrete codes of shape {list(tokenizer.token_shape)}")
        raise CheckpointError(f"{path}: MAR models latents of {prior.vae_embed_dim} channels"
                              + (f" at stride {stride}" if stride else "")
                              + f"; the given stage-1 model makes {made}; pass the VAE it was trained with")


def sampling_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs of the training config's `experiment.sample` (what the previews use)."""
    return dict((config.get("experiment") or {}).get("sample") or {})


# ----------------------------------------------------------------------------------------------
# Optimizer and learning rate
# ----------------------------------------------------------------------------------------------

def is_decayed(name: str, ndim: int) -> bool:
    """The official rule: no weight decay on 1-D tensors, biases and anything of the DiffLoss."""
    return not (ndim == 1 or name.endswith(".bias") or "diffloss" in name)


def official_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """[no decay, decay] in this order, each in named_parameters order, so official optimizer states load."""
    groups: dict[bool, list[nn.Parameter]] = {False: [], True: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[is_decayed(name, param.ndim)].append(param)
    return [{"params": groups[False], "weight_decay": 0.0}, {"params": groups[True], "weight_decay": weight_decay}]


def peak_lr(config: Mapping[str, Any], world_size: int) -> float:
    """`mar.lr`, or blr x global batch / 256 with the global batch of one optimizer step."""
    mar = config["mar"]
    if mar["lr"] is not None:
        return mar["lr"]
    batch = config["experiment"]["batch_size"] * world_size * accumulation_steps(config, world_size)
    return mar["blr"] * batch / 256


def lr_at(epoch: float, peak: float, mar: Mapping[str, Any], epochs: int) -> float:
    """The rate at a fractional epoch: linear warm-up from 0, then constant or a half cosine to min_lr."""
    warmup = mar["warmup_epochs"]
    if epoch < warmup:
        return peak * epoch / warmup
    if mar["lr_schedule"] == "constant":
        return peak
    progress = (epoch - warmup) / max(epochs - warmup, 1e-12)
    return mar["min_lr"] + (peak - mar["min_lr"]) * 0.5 * (1.0 + math.cos(math.pi * progress))


class IterationLR:
    """The official per-iteration schedule: the rate is set before each step from the fractional epoch
    (epoch + batch / batches per epoch). It keeps no state: the trainer's position is what it reads,
    so a resumed run, ours or an official one, continues on the same curve."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak: float, mar: Mapping[str, Any], epochs: int,
                 batches_per_epoch: int):
        self.optimizer, self.peak, self.mar = optimizer, peak, dict(mar)
        self.epochs, self.batches_per_epoch = epochs, batches_per_epoch

    def set(self, position: Position) -> None:
        lr = lr_at(position.epoch + position.batch_in_epoch / self.batches_per_epoch, self.peak, self.mar,
                   self.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        """Nothing to do after a step: the next step sets its own rate."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class MARStage2Task(PriorTask):
    """The TrainTask of MAR (see common/prior_task.py)."""

    def __init__(self, config: Config, env: DistEnv, steps_per_epoch: int, tokenizer: nn.Module):
        model = MAR.from_config(config["arch"]).to(env.device)
        mar, optimizer = config["mar"], config["optimizer"]
        super().__init__(config, env, tokenizer, model, mar["ema_rate"], mar["grad_clip"], sampling_defaults(config))
        self.peak_lr = peak_lr(config, env.world_size)
        self.optimizer = torch.optim.AdamW(official_param_groups(self.model, optimizer["weight_decay"]),
                                           lr=self.peak_lr, betas=tuple(optimizer["betas"]), eps=optimizer["eps"])
        self.scheduler = IterationLR(self.optimizer, self.peak_lr, mar, config["experiment"]["epochs"],
                                     steps_per_epoch)

    def train_step(self, batch: dict, position: Position) -> dict[str, float]:
        self.scheduler.set(position)
        return super().train_step(batch, position)

    def loss_inputs(self, batch: dict, position: Position | None) -> tuple[tuple, dict]:
        return (self.encode(batch), self.labels(batch)), {}


# ----------------------------------------------------------------------------------------------
# Continuing an official training run
# ----------------------------------------------------------------------------------------------

def check_official_weights(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], path: str) -> None:
    """Refuse official weights that do not fit the model of `config` (listing the keys), without allocating it:
    the model is made on the meta device, where loading copies nothing."""
    with torch.device("meta"):
        model = MAR.from_config(config["arch"], path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that copying into meta tensors is a no-op: what we want
        strict_load(model, state, path)


def official_training_state(obj: Mapping[str, Any], path: str, config: Config, batches_per_epoch: int
                            ) -> dict[str, Any]:
    """One of our checkpoints (without the format tag) that continues an official `checkpoint-last.pth` with
    `optimizer` and `epoch`: the weights, the EMA (`model_ema`, else the weights), the AdamW state and the
    position after its last epoch. The loss scaler, args and RNG states are not carried over."""
    model = official_mar_state(obj, use_ema=False)
    if model is None:
        raise CheckpointError(f"{path}: not an official MAR checkpoint (expected 'model' / 'model_ema' state dicts)")
    check_official_weights(model, config, path)
    optimizer = obj["optimizer"]
    groups = optimizer.get("param_groups") if isinstance(optimizer, Mapping) else None
    decayed = [is_decayed(name, tensor.ndim) for name, tensor in model.items()]
    expected = [decayed.count(False), decayed.count(True)]
    found = [len(group.get("params", ())) for group in groups or ()]
    if found != expected:
        raise CheckpointError(f"{path}: the optimizer state has parameter groups of {found} tensors, the official "
                              f"ones of this model have {expected} (no decay, decay)")
    ema = official_mar_state(obj, use_ema=True)
    epoch = int(obj["epoch"]) + 1  # the official run saves after finishing that epoch
    position = Position(epoch=epoch, step=epoch * batches_per_epoch)
    return {"config": config.to_dict(), "kind": "mar", "model": model,
            "ema": {"num_updates": position.step, "shadow": ema}, "optimizer": optimizer, "scheduler": {},
            "position": dataclasses.asdict(position), "rng": []}

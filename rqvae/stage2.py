"""Stage-2 training of the RQ-Transformer on the codes of a frozen RQ-VAE (not released officially).

As the official configs describe it (spec 4.7): AdamW, cosine decay, gradient clipping, EMA of
the weights, mixed precision, and soft targets from the RQ-VAE (`soft_target_cross_entropy`,
input codes sampled along the residual path) or plain cross-entropy on the codes. Codes come
from images encoded on the fly, or from shards written by scripts/extract_codes.py
(`codes.train`), which is faster but allows only plain cross-entropy.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.config import ANY, Config, Field
from common.data import DATASET_SCHEMA
from common.dist import DistEnv, is_distributed
from common.ema import ModelEMA
from common.errors import ConfigError
from common.optim import OPTIMIZER_SCHEMA, build_optimizer, build_scheduler
from common.trainer import EXPERIMENT_SCHEMA, Position
from rqvae.schema import RQTRANSFORMER_ARCH
from rqvae.transformer import RQTransformer

STAGE2_SCHEMA = {
    "dataset": DATASET_SCHEMA,
    "codes": {
        "train": Field(str, None, doc="ours: folder of extracted code shards to train on instead of images"),
        "val": Field(str, None),
    },
    "vqvae": {"ckpt": Field(str, None, doc="the stage-1 checkpoint (ours or official) whose codes are modelled"),
              "*": ANY},  # released configs also copy the stage-1 arch here
    "arch": RQTRANSFORMER_ARCH,
    "loss": {
        "type": Field(str, "cross_entropy", choices=("cross_entropy", "soft_target_cross_entropy")),
        "stochastic_codes": Field(bool, False, doc="sample input codes from the soft codes"),
        "temp": Field(float, 1.0, doc="soft-code temperature"),
    },
    "optimizer": OPTIMIZER_SCHEMA,
    "experiment": EXPERIMENT_SCHEMA,
    "sampling": ANY,
    "seed": Field(int, 0),
    "runtime": ANY,
    "result_path": ANY,
}


class LossModule(nn.Module):
    """A prior's `loss` behind `forward`, so that DDP, which synchronises what forward computes, can wrap it."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, *args, **kwargs):
        return self.prior.loss(*args, **kwargs)


def resolve_arch(config: Mapping[str, Any], tokenizer: nn.Module, source: str) -> Config:
    """Fill what the official training set-up fills (vocab_size, input_embed_dim) and check it fits the tokenizer."""
    arch = dict(config["arch"])
    if arch.get("vocab_size") is None:
        arch["vocab_size"] = config["dataset"].get("vocab_size") or tokenizer.vocab_size
    if arch.get("input_embed_dim") is None:
        arch["input_embed_dim"] = tokenizer.quantizer.codebooks[0].dim
    if tuple(arch["block_size"]) != tuple(tokenizer.code_shape):
        raise ConfigError(f"{source}: arch.block_size {list(arch['block_size'])} does not match the stage-1 code shape "
                          f"{list(tokenizer.code_shape)}")
    return Config(arch)


class RQTransformerStage2Task:
    """The TrainTask of the RQ-Transformer (see common/trainer.py)."""

    def __init__(self, config: Config, env: DistEnv, steps_per_epoch: int, tokenizer: nn.Module):
        self.env = env
        self.config = config
        self.loss_cfg = config["loss"]
        self.tokenizer = tokenizer.to(env.device).eval().requires_grad_(False)
        self.model = RQTransformer.from_config(config["arch"]).to(env.device)
        self.model.set_codebook_from(self.tokenizer)
        self.ema = ModelEMA(self.model, 0.999, warmup="rqvae") if config["arch"]["ema"] else None
        self.train_loss = LossModule(self.model)
        if is_distributed():
            self.train_loss = DistributedDataParallel(self.train_loss)

        experiment, optimizer_cfg = config["experiment"], config["optimizer"]
        total = experiment["total_batch_size"] or experiment["batch_size"] * env.world_size
        self.accumulation = max(1, total // (experiment["batch_size"] * env.world_size))
        self.optimizer = build_optimizer(self.model.parameters(), optimizer_cfg)
        self.scheduler = build_scheduler(self.optimizer, optimizer_cfg, max(1, steps_per_epoch // self.accumulation),
                                         experiment["epochs"], env.world_size)
        self.max_grad_norm = optimizer_cfg["max_gn"]
        self.autocast_dtype = torch.bfloat16 if experiment["amp"] and env.device.type == "cuda" else None
        self.micro_step = 0

    def state_objects(self) -> dict[str, Any]:
        objects = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}
        if self.ema is not None:
            objects["ema"] = self.ema
        return objects

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def codes_and_targets(self, batch: dict, soft: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input codes (B, h, w, D) and, for the soft-target loss, the target distributions."""
        if "codes" in batch:
            return batch["codes"].to(self.env.device), None
        images = batch["image"].to(self.env.device)
        if soft:
            probs, codes = self.tokenizer.soft_codes(images, self.loss_cfg["temp"], self.loss_cfg["stochastic_codes"])
            return codes, probs
        return self.tokenizer.encode_codes(images), None

    def train_step(self, batch: dict, position: Position) -> dict[str, float]:
        soft = self.loss_cfg["type"] == "soft_target_cross_entropy"
        codes, targets = self.codes_and_targets(batch, soft)
        cond = batch["label"].to(self.env.device) if self.model.num_classes > 1 else None
        self.micro_step += 1
        update = self.micro_step % self.accumulation == 0
        sync = contextlib.nullcontext() if update or not is_distributed() else self.train_loss.no_sync()
        with sync:
            with self.autocast():
                loss, logs = self.train_loss(codes, cond, soft_targets=targets)
            (loss / self.accumulation).backward()
        if update:
            if self.max_grad_norm is not None:
                logs["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm).item()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
        logs["lr"] = self.scheduler.get_last_lr()[0]
        return logs

    def eval_model(self) -> contextlib.AbstractContextManager:
        return self.ema.swapped_in(self.model) if self.ema is not None else contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        totals: dict[str, float] = {}
        count = 0
        self.model.eval()
        with self.eval_model():
            for batch in batches:
                codes, _ = self.codes_and_targets(batch, soft=False)
                cond = batch["label"].to(self.env.device) if self.model.num_classes > 1 else None
                with self.autocast():
                    _, logs = self.model.loss(codes, cond)
                for key, value in logs.items():
                    totals[key] = totals.get(key, 0.0) + value
                count += 1
        self.model.train()
        return {f"val_{key}": value / max(count, 1) for key, value in totals.items()}

    @torch.no_grad()
    def preview(self, batch: dict) -> torch.Tensor:
        """One sample per class (the first ten classes), with the training-time sampling settings."""
        sample = self.config["experiment"]["sample"] or {}
        num = min(10, self.model.num_classes) if self.model.num_classes > 1 else 8
        cond = torch.arange(num, device=self.env.device) % self.model.num_classes
        if self.model.num_classes == 1:
            cond = torch.zeros_like(cond)
        self.model.eval()
        with self.eval_model(), self.autocast():
            codes = self.model.generate(cond, top_k=sample.get("top_k"), top_p=sample.get("top_p"))
        self.model.train()
        return self.tokenizer.decode_codes(codes).clamp(-1, 1).float().cpu()

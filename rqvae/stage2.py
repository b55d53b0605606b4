"""Stage-2 training of the RQ-Transformer on the codes of a frozen RQ-VAE (not released officially).

As the official configs describe it: AdamW, cosine decay, gradient clipping, EMA of
the weights, mixed precision, and soft targets from the RQ-VAE (`soft_target_cross_entropy`,
input codes sampled along the residual path) or plain cross-entropy on the codes. Codes come
from images encoded on the fly, or from shards written by scripts/extract_codes.py
(`codes.train`), which is faster but allows only plain cross-entropy.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from common.token_cache import CODES_SCHEMA, TOKENIZER_SCHEMA
from common.config import ANY, Config, Field
from common.data import DATASET_SCHEMA
from common.dist import DistEnv
from common.errors import CheckpointError, ConfigError
from common.optim import OPTIMIZER_SCHEMA, build_optimizer, build_scheduler
from common.prior_task import PriorTask
from common.trainer import EXPERIMENT_SCHEMA, Position
from rqvae.schema import RQTRANSFORMER_ARCH
from rqvae.transformer import RQTransformer
from rqvae.vqvae import RQVAE

STAGE2_SCHEMA = {
    "dataset": DATASET_SCHEMA,
    "codes": CODES_SCHEMA,
    "tokenizer": TOKENIZER_SCHEMA,
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


def prepare(config: Config, tokenizer: nn.Module, source: str) -> Config:
    """The arch section filled as the official training set-up fills it (vocab_size, input_embed_dim) and
    checked against the tokenizer; soft targets need images, not extracted codes."""
    if config["codes"]["train"] and config["loss"]["type"] == "soft_target_cross_entropy":
        raise ConfigError("codes.train: soft targets need the images; use loss.type=cross_entropy with "
                          "extracted codes, or train on images")
    if not isinstance(tokenizer, RQVAE):
        raise ConfigError(f"{source}: an RQ-Transformer models the codes of an RQ-VAE, and the stage-1 model "
                          f"given is a {type(tokenizer).__name__}")
    arch = dict(config["arch"])
    if arch.get("vocab_size") is None:
        arch["vocab_size"] = config["dataset"].get("vocab_size") or tokenizer.vocab_size
    if arch.get("input_embed_dim") is None:
        arch["input_embed_dim"] = tokenizer.quantizer.codebooks[0].dim
    if tuple(arch["block_size"]) != tuple(tokenizer.code_shape):
        raise ConfigError(f"{source}: arch.block_size {list(arch['block_size'])} does not match the stage-1 code shape "
                          f"{list(tokenizer.code_shape)}")
    config["arch"] = Config(arch)
    return config


@torch.no_grad()
def check_tokenizer(prior: RQTransformer, tokenizer: nn.Module, path: str, config: Mapping[str, Any]) -> None:
    """Our priors keep the codebook they were trained on: the tokenizer must have the same one."""
    if not isinstance(tokenizer, RQVAE):
        raise CheckpointError(f"{path}: an RQ-Transformer models the codes of an RQ-VAE, and the stage-1 model given "
                              f"is a {type(tokenizer).__name__}; pass the RQ-VAE it was trained with")
    if not hasattr(prior, "codebook"):  # token tables of its own: only the code shape must agree
        found = (tokenizer.vocab_size, tuple(tokenizer.code_shape))
        if found != (prior.vocab_size, prior.block_size):
            raise CheckpointError(f"{path}: the prior models {prior.vocab_size} codes of shape "
                                  f"{list(prior.block_size)}, the given stage-1 model makes {found[0]} codes of "
                                  f"shape {list(found[1])}")
        return
    saved = prior.codebook.clone()
    prior.set_codebook_from(tokenizer, source=f"{path} with the given stage-1 model")
    if not torch.equal(saved, prior.codebook.to(saved.device)):
        trained_with = (config.get("vqvae") or {}).get("ckpt")
        raise CheckpointError(f"{path}: the prior was trained on the codes of another RQ-VAE (its codebook differs "
                              f"from the given stage-1 model's); pass the stage-1 checkpoint it was trained with"
                              + (f" ({trained_with})" if trained_with else ""))


def sampling_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs of `experiment.sample` (official names: temp, top_k, top_p)."""
    sample = (config.get("experiment") or {}).get("sample") or {}
    return {"temperature": sample.get("temp", 1.0), "top_k": sample.get("top_k"), "top_p": sample.get("top_p")}


class RQTransformerStage2Task(PriorTask):
    """The TrainTask of the RQ-Transformer (see common/prior_task.py)."""

    def __init__(self, config: Config, env: DistEnv, steps_per_epoch: int, tokenizer: nn.Module):
        model = RQTransformer.from_config(config["arch"]).to(env.device)
        model.set_codebook_from(tokenizer)
        super().__init__(config, env, tokenizer, model, 0.999 if config["arch"]["ema"] else None,
                         config["optimizer"]["max_gn"], sampling_defaults(config), ema_warmup="rqvae")
        self.loss_cfg = config["loss"]
        optimizer_cfg = config["optimizer"]
        self.optimizer = build_optimizer(self.model.parameters(), optimizer_cfg)
        self.scheduler = build_scheduler(self.optimizer, optimizer_cfg, max(1, steps_per_epoch // self.accumulation),
                                         config["experiment"]["epochs"], env.world_size)

    @torch.no_grad()
    def codes_and_targets(self, batch: dict, soft: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input codes (B, h, w, D) and, for the soft-target loss, the target distributions."""
        if soft and "image" in batch:
            images = batch["image"].to(self.env.device)
            probs, codes = self.tokenizer.soft_codes(images, self.loss_cfg["temp"], self.loss_cfg["stochastic_codes"])
            return codes, probs
        return self.encode(batch), None

    def loss_inputs(self, batch: dict, position: Position | None) -> tuple[tuple, dict]:
        soft = position is not None and self.loss_cfg["type"] == "soft_target_cross_entropy"
        codes, targets = self.codes_and_targets(batch, soft)
        cond = self.labels(batch) if self.model.num_classes > 1 else None
        return (codes, cond), {"soft_targets": targets} if soft else {}

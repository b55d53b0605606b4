"""Stage-2 training of the RQ-Transformer on the codes of a frozen RQ-VAE (not released officially).

As the official configs describe it: AdamW, cosine decay, gradient clipping, EMA of
the weights, mixed precision, and soft targets from the RQ-VAE (`soft_target_cross_entropy`,
input codes sampled along the residual path) or plain cross-entropy on the codes. Codes come
from images encoded on the fly, or from shards written by scripts/extract_codes.py
(`codes.train`), which is faster but allows only plain cross-entropy. On the codes (h, w) of a
tokenizer without code depth (LlamaGen VQ, Open-MAGVIT2) it models them as (h, w, 1), with code
embeddings of its own (common/code_view.py).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from common.code_view import with_depth
from common.token_cache import CODES_SCHEMA, TOKENIZER_SCHEMA
from common.config import ANY, Config, Field
from common.dist import DistEnv
from common.errors import CheckpointError, ConfigError
from common.optim import OPTIMIZER_SCHEMA, build_optimizer, build_scheduler
from common.prior_task import PriorTask
from common.tokenizer import DISCRETE
from common.trainer import EXPERIMENT_SCHEMA, Position
from rqvae.schema import RQTRANSFORMER_ARCH
from rqvae.text_data import STAGE2_DATASET, dataset_section, run_text_tokenizer
from rqvae.transformer import RQTransformer
from rqvae.vqvae import RQVAE

STAGE2_SCHEMA = {
    "dataset": STAGE2_DATASET,
    "codes": CODES_SCHEMA,
    "tokenizer": TOKENIZER_SCHEMA,
    "vqvae": {"ckpt": Field(str, None, doc="the stage-1 checkpoint (ours or official) whose codes are modelled"),
              "*": ANY},  # released configs also copy the stage-1 arch here
    "arch": RQTRANSFORMER_ARCH,
    "loss": {
        "type": Field(str, "cross_entropy", choices=("cross_entropy", "soft_target_cross_entropy")),
        "stochastic_codes": Field(bool, False, doc="sample input codes from the soft codes"),
        "temp": Field(float, 1.0, doc="soft-code temperature"),
        "img_weight": Field(float, 0.9, doc="text models: weight of the image loss"),
        "txt_weight": Field(float, 0.1, doc="text models: weight of the caption's next-token loss"),
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
    checked against the tokenizer; soft targets need images, not extracted codes.

    On a tokenizer without code depth (LlamaGen VQ, Open-MAGVIT2) the codes (h, w) are modelled as (h, w, 1)
    (common/code_view.py) with the prior's own code embeddings, there being no RQ-VAE codebook to read. The
    `dataset` section is read as rqvae/text_data.py says (the official CC-3M keys; captions for text models)."""
    config["dataset"] = dataset_section(config, source)
    soft = config["loss"]["type"] == "soft_target_cross_entropy"
    if config["codes"]["train"] and soft:
        raise ConfigError("codes.train: soft targets need the images; use loss.type=cross_entropy with "
                          "extracted codes, or train on images")
    if tokenizer.kind != DISCRETE:
        raise ConfigError(f"{source}: an RQ-Transformer models discrete codes, and the stage-1 model given "
                          f"({type(tokenizer).__name__}) makes continuous tokens")
    arch = dict(config["arch"])
    if not isinstance(tokenizer, RQVAE):
        name = type(tokenizer).__name__
        if arch["input_emb_vqvae"] or arch["head_emb_vqvae"]:
            raise ConfigError(f"{source}: arch.input_emb_vqvae and arch.head_emb_vqvae read an RQ-VAE's codebook, and "
                              f"the stage-1 model given is a {name}; set both to false (the prior learns its own "
                              "code embeddings)")
        if soft:
            raise ConfigError(f"{source}: loss.type soft_target_cross_entropy needs an RQ-VAE's soft codes, and the "
                              f"stage-1 model given is a {name}; use loss.type=cross_entropy")
    elif arch.get("input_embed_dim") is None:
        arch["input_embed_dim"] = tokenizer.quantizer.codebooks[0].dim
    if arch.get("vocab_size") is None:
        arch["vocab_size"] = config["dataset"].get("vocab_size") or tokenizer.vocab_size
    vocab_size = arch["vocab_size"] if isinstance(arch["vocab_size"], int) else arch["vocab_size"][0]
    if vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"{source}: arch.vocab_size {vocab_size} does not match the {tokenizer.vocab_size}-entry "
                          "codebook of the stage-1 model given; leave arch.vocab_size null to take the tokenizer's")
    shape = with_depth(tokenizer.code_shape)
    if tuple(arch["block_size"]) != shape:
        raise ConfigError(f"{source}: arch.block_size {list(arch['block_size'])} does not match the stage-1 codes, "
                          f"{list(shape)} (h, w, depth)")
    config["arch"] = Config(arch)
    return config


@torch.no_grad()
def check_tokenizer(prior: RQTransformer, tokenizer: nn.Module, path: str, config: Mapping[str, Any]) -> None:
    """Our priors keep the codebook they were trained on: the tokenizer must have the same one. A prior with token
    tables of its own needs codes of its vocabulary and shape ((h, w) codes count as (h, w, 1))."""
    if not hasattr(prior, "codebook"):
        if tokenizer.kind != DISCRETE:
            raise CheckpointError(f"{path}: an RQ-Transformer models discrete codes, and the stage-1 model given "
                                  f"({type(tokenizer).__name__}) makes continuous tokens")
        found = (tokenizer.vocab_size, with_depth(tokenizer.code_shape))
        if found != (prior.vocab_size, prior.block_size):
            raise CheckpointError(f"{path}: the prior models {prior.vocab_size} codes of shape "
                                  f"{list(prior.block_size)}, the given stage-1 model makes {found[0]} codes of "
                                  f"shape {list(found[1])}")
        return
    if not isinstance(tokenizer, RQVAE):
        raise CheckpointError(f"{path}: this RQ-Transformer reads an RQ-VAE's codebook, and the stage-1 model given "
                              f"is a {type(tokenizer).__name__}; pass the RQ-VAE it was trained with")
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
        text_tokenizer = run_text_tokenizer(config, env) if config["arch"]["block_size_cond"] > 1 else None
        model = RQTransformer.from_config(config["arch"]).to(env.device)
        model.text_tokenizer = text_tokenizer
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

    def state_objects(self) -> dict[str, Any]:
        objects = super().state_objects()
        if self.model.text_tokenizer is not None:  # checkpoints carry it: prompts need it, and resume keeps it
            objects["text_tokenizer"] = self.model.text_tokenizer
        return objects

    def conditions(self, batch: dict, training: bool) -> torch.Tensor | None:
        """A text model's caption tokens (BPE dropout in training), class labels, or None (unconditional)."""
        if self.model.text_tokenizer is not None:
            return self.model.text_tokenizer.encode(batch["caption"], training).to(self.env.device)
        return self.labels(batch) if self.model.num_classes > 1 else None

    def loss_inputs(self, batch: dict, position: Position | None) -> tuple[tuple, dict]:
        soft = position is not None and self.loss_cfg["type"] == "soft_target_cross_entropy"
        codes, targets = self.codes_and_targets(batch, soft)
        kwargs = {"soft_targets": targets} if soft else {}
        if self.model.text_tokenizer is not None:
            kwargs.update(img_weight=self.loss_cfg["img_weight"], txt_weight=self.loss_cfg["txt_weight"])
        return (codes, self.conditions(batch, training=position is not None)), kwargs

    def preview_conditions(self, batch: dict) -> torch.Tensor:
        """A text model draws one image per caption of the batch (the first validation items)."""
        if self.model.text_tokenizer is not None:
            return self.conditions(batch, training=False)
        return super().preview_conditions(batch)

"""Which method handles a config or a checkpoint: the one place that knows every method package.

Entry scripts ask here for a stage-1 schema and training task, or for a tokenizer / prior
from a checkpoint file (ours, self-describing, or an official one recognised by its layout).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from common.checkpoint import is_our_checkpoint, load_file
from common.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Stage1Method:
    name: str
    schema: Mapping[str, Any]
    task: Callable[..., Any]  # (config, env, steps_per_epoch, vgg_weights) -> TrainTask


def stage1_method(raw_config: Mapping[str, Any], path: str) -> Stage1Method:
    """The tokenizer family of a stage-1 YAML, from `arch.type`."""
    arch_type = (raw_config.get("arch") or {}).get("type") if isinstance(raw_config.get("arch"), Mapping) else None
    if arch_type == "rq-vae":
        from rqvae.stage1 import STAGE1_SCHEMA, RQVAEStage1Task

        return Stage1Method("rqvae", STAGE1_SCHEMA, RQVAEStage1Task)
    raise ConfigError(f"{path}: arch.type must name a tokenizer this codebase trains (rq-vae), got {arch_type!r}")


def build_tokenizer_from_config(config: Mapping[str, Any]) -> torch.nn.Module:
    arch_type = config["arch"]["type"]
    if arch_type == "rq-vae":
        from rqvae.vqvae import RQVAE

        return RQVAE.from_config(config["arch"])
    raise CheckpointError(f"checkpoint holds a {arch_type!r} model, not a tokenizer")


def load_tokenizer(path: str, config_path: str | None = None, use_ema: bool = True,
                   map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A tokenizer in eval mode from our checkpoint or an official one; returns (model, resolved config).

    Our checkpoints carry their config; an official RQ-VAE `.pt` needs `config.yaml` beside it.
    EMA weights are used when the checkpoint has them and `use_ema` is true.
    """
    obj = load_file(path, map_location)
    if is_our_checkpoint(obj):
        from common.checkpoint import strict_load

        model = build_tokenizer_from_config(obj["config"])
        weights = obj["ema"]["shadow"] if use_ema and obj.get("ema") else obj["model"]
        strict_load(model, weights, path)
        return model.eval(), obj["config"]
    from rqvae import official as rqvae_official

    if rqvae_official.is_official_rqvae_checkpoint(obj):
        model = rqvae_official.load_official_rqvae(path)
        from common.config import read_yaml

        return model.eval(), read_yaml(os.path.join(os.path.dirname(path), "config.yaml"))
    raise CheckpointError(f"{path}: not a tokenizer checkpoint this codebase knows (ours, or an official RQ-VAE .pt)")

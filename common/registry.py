"""What a method package tells the rest of the codebase about itself: one `Method` record.

Each package (rqvae, lfq, npp, mar) exports `METHOD` from its `method.py`; `methods.py` loops over
those records to find the tokenizer or prior of a config (`arch.type`) or of one of our checkpoints
(`kind`), and asks each record in turn whether a foreign file is one of its official layouts. The
official-layout hooks return None for anything that is not theirs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from common.config import Config
from common.tokenizer import Tokenizer

Weights = dict[str, torch.Tensor]


def not_mine(*args: Any, **kwargs: Any) -> None:
    """The hook of a method that has no official file of this kind."""
    return None


@dataclass(frozen=True)
class TokenizerType:
    """A tokenizer architecture: `arch.type` of its configs and `kind` of our checkpoints."""

    arch_type: str
    build: Callable[[Mapping[str, Any]], Tokenizer]  # from a config's `arch` section
    schema: Mapping[str, Any] | None = None  # the training config; None: not trained here
    task: Callable[..., Any] | None = None  # (config, env, steps_per_epoch, vgg_weights) -> TrainTask


@dataclass(frozen=True)
class PriorType:
    """A prior architecture: its class (which declares SAMPLING_KNOBS), training config and task."""

    arch_type: str
    prior_class: type[nn.Module]
    build: Callable[[Mapping[str, Any], str], nn.Module]  # (arch section, source) -> prior
    schema: Mapping[str, Any]
    task: Callable[..., Any]  # (config, env, steps_per_epoch, tokenizer) -> TrainTask
    prepare: Callable[[Config, Tokenizer, str], Config]  # fills the arch from the tokenizer, checks the config
    check_tokenizer: Callable[[nn.Module, Tokenizer, str, Mapping[str, Any]], None]  # refuses a mismatched one
    sampling_defaults: Callable[[Mapping[str, Any]], dict[str, Any]]  # knob defaults of one of our configs


@dataclass(frozen=True)
class OfficialFormats:
    """Hooks that recognise and read a method's released files; each returns None for other files."""

    stage1_config: Callable[[Mapping[str, Any], str], dict[str, Any] | None] = not_mine
    """(raw YAML, path) -> our stage-1 config data, for an official training YAML."""
    tokenizer: Callable[..., tuple[Tokenizer, Mapping[str, Any]] | None] = not_mine
    """(loaded file, path, config path or None, use_ema) -> (tokenizer in eval mode, config)."""
    tokenizer_weights: Callable[..., tuple[Weights, Weights | None] | None] = not_mine
    """(loaded file, path, model, use_ema) -> (tokenizer weights, discriminator weights or None) for -l."""
    prior: Callable[..., tuple[nn.Module, Mapping[str, Any], dict[str, Any]] | None] = not_mine
    """(loaded file, path, tokenizer, use_ema, config path or None) -> (prior in eval mode, config, knob defaults
    plus `ema`, whether EMA weights were loaded)."""
    prior_weights: Callable[..., Weights | None] = not_mine
    """(loaded file, path, model) -> the prior's weights, to start a training run from (-l)."""


@dataclass(frozen=True)
class Method:
    name: str
    tokenizers: tuple[TokenizerType, ...] = ()
    priors: tuple[PriorType, ...] = ()
    official: OfficialFormats = OfficialFormats()

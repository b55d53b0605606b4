"""The registry of methods: each method package exports one record, and this module loops over them.

Entry scripts ask here for the tokenizer or prior type of a config (`arch.type`), and for a tokenizer
or prior from a checkpoint file: ours (self-describing: its `kind` names the type), or an official
one, which each record's hooks recognise by its layout. Adding a method is one package with a
`method.py` record, listed in METHODS.
"""
from __future__ import annotations

import argparse
from typing import Any, Iterable, Mapping

import torch

from common.checkpoint import is_our_checkpoint, load_file, strict_load
from common.code_view import view_for
from common.errors import CheckpointError, ConfigError
from common.knobs import Knob
from common.registry import Method, PriorType, TokenizerType, Weights
from common.sampler import Sampler, build_sampler
from common.text_tokenizer import TextTokenizer, text_tokenizer_for
from common.tokenizer import Tokenizer
from common.weights import resolve_checkpoint
from lfq.method import METHOD as LFQ
from mar.method import METHOD as MAR
from npp.method import METHOD as NPP
from rqvae.method import METHOD as RQVAE

METHODS: tuple[Method, ...] = (RQVAE, LFQ, NPP, MAR)

TOKENIZERS: dict[str, TokenizerType] = {t.arch_type: t for method in METHODS for t in method.tokenizers}
PRIORS: dict[str, PriorType] = {p.arch_type: p for method in METHODS for p in method.priors}


def arch_type(raw_config: Mapping[str, Any]) -> Any:
    arch = raw_config.get("arch")
    return arch.get("type") if isinstance(arch, Mapping) else None


def first_answer(hook: str, *args: Any) -> Any:
    """The first non-None answer of the official-format hook `hook` over the records."""
    for method in METHODS:
        answer = getattr(method.official, hook)(*args)
        if answer is not None:
            return answer
    return None


# ----------------------------------------------------------------------------------------------
# Training configs
# ----------------------------------------------------------------------------------------------

def stage1_config_data(raw_config: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A stage-1 YAML's data in our form: an official training YAML (Open-MAGVIT2's) is converted, ours kept."""
    return first_answer("stage1_config", raw_config, path) or dict(raw_config)


def stage1_type(raw_config: Mapping[str, Any], path: str) -> TokenizerType:
    """The tokenizer a stage-1 config trains (after `stage1_config_data`), from `arch.type`."""
    trainable = [name for name, t in TOKENIZERS.items() if t.schema is not None]
    found = TOKENIZERS.get(arch_type(raw_config))
    if found is None or found.schema is None:
        raise ConfigError(f"{path}: arch.type must name a tokenizer this codebase trains ({', '.join(trainable)}), "
                          f"got {arch_type(raw_config)!r}")
    return found


def stage2_type(raw_config: Mapping[str, Any], path: str) -> PriorType:
    """The prior a stage-2 config trains, from `arch.type`."""
    found = PRIORS.get(arch_type(raw_config))
    if found is None:
        raise ConfigError(f"{path}: arch.type must name a prior this codebase trains ({', '.join(PRIORS)}), "
                          f"got {arch_type(raw_config)!r}")
    return found


def prior_type_of(prior: torch.nn.Module) -> PriorType:
    return next(p for p in PRIORS.values() if isinstance(prior, p.prior_class))


# ----------------------------------------------------------------------------------------------
# Starting weights (-l)
# ----------------------------------------------------------------------------------------------

def stage1_starting_weights(obj: Any, path: str, model: torch.nn.Module, use_ema: bool = True
                            ) -> tuple[Weights, Weights | None]:
    """(tokenizer weights, discriminator weights or None) to fine-tune from a loaded stage-1 checkpoint,
    ours or an official one; EMA weights where kept, unless `use_ema` is false."""
    if is_our_checkpoint(obj):
        if obj.get("kind") in PRIORS:
            raise CheckpointError(f"{path}: holds a {obj.get('kind')!r} model, not a tokenizer; -l takes a stage-1 "
                                  "checkpoint")
        if use_ema and obj.get("ema"):
            return obj["ema"]["shadow"], (obj.get("disc_ema") or {}).get("shadow", obj.get("discriminator"))
        return obj["model"], obj.get("discriminator")
    weights = first_answer("tokenizer_weights", obj, path, model, use_ema)
    if weights is None:
        raise CheckpointError(f"{path}: not weights of this config's tokenizer ({type(model).__name__}); -l takes one "
                              "of our checkpoints or an official file of that tokenizer")
    return weights


def stage2_starting_weights(path: str, model: torch.nn.Module) -> Weights:
    """The prior's weights from our checkpoint, an official file or a released one's name, to start a training
    run from."""
    obj = load_file(resolve_checkpoint(path).path)
    if is_our_checkpoint(obj):
        if obj.get("kind") in TOKENIZERS:
            raise CheckpointError(f"{path}: holds a {obj.get('kind')!r} model, not a stage-2 prior; -l takes a "
                                  "stage-2 checkpoint")
        return obj["model"]
    weights = first_answer("prior_weights", obj, path, model)
    if weights is None:
        raise CheckpointError(f"{path}: not a {type(model).__name__} checkpoint (ours or an official stage-2 file "
                              "of this prior)")
    return weights


# ----------------------------------------------------------------------------------------------
# Loading for inference
# ----------------------------------------------------------------------------------------------

def load_tokenizer(path: str, config_path: str | None = None, use_ema: bool = True,
                   map_location: str | torch.device = "cpu") -> tuple[Tokenizer, dict[str, Any]]:
    """A tokenizer in eval mode from our checkpoint or an official one; returns (model, resolved config).

    Our checkpoints carry their config. Official files are read by their method's hooks: an RQ-VAE
    `.pt` needs `config.yaml` beside it, an Open-MAGVIT2 `.ckpt` its YAML as `config_path`, a LlamaGen
    VQ `.pt` is rebuilt from its weight shapes (or `config_path`). EMA weights are used when the
    checkpoint has them and `use_ema` is true. A release name (`scripts/download.py --list`) stands for its
    downloaded file, with the config released beside it.
    """
    path, config_path = resolve_checkpoint(path, config_path)
    obj = load_file(path, map_location)
    if is_our_checkpoint(obj):
        config = obj["config"]
        found = TOKENIZERS.get(config["arch"]["type"])
        if found is None:
            raise CheckpointError(f"{path}: holds a {config['arch']['type']!r} model, not a tokenizer; give a "
                                  "stage-1 (tokenizer) checkpoint")
        model = found.build(config["arch"])
        strict_load(model, obj["ema"]["shadow"] if use_ema and obj.get("ema") else obj["model"], path)
        return model.eval(), config
    loaded = first_answer("tokenizer", obj, path, config_path, use_ema)
    if loaded is None:
        raise CheckpointError(f"{path}: not a tokenizer checkpoint this codebase knows (ours, an official RQ-VAE .pt, "
                              "an official Open-MAGVIT2 .ckpt, an official LlamaGen VQ .pt or "
                              "MAR's kl16.ckpt)")
    return loaded


def load_prior(path: str, tokenizer: Tokenizer, use_ema: bool = True, config_path: str | None = None,
               map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """A stage-2 prior in eval mode for the tokens of `tokenizer`; returns (prior, config, knob defaults).

    The defaults are the checkpoint's sampling knobs (the training config's `experiment.sample` for
    ours, the release's settings for official files) and `ema`, whether EMA weights were loaded.
    A tokenizer whose tokens the prior does not model is refused. `path` may be a release name.
    """
    path, config_path = resolve_checkpoint(path, config_path)
    obj = load_file(path, map_location)
    if is_our_checkpoint(obj):
        found = PRIORS.get(obj.get("kind"))
        if found is None:
            raise CheckpointError(f"{path}: holds a {obj.get('kind')!r} model, not a stage-2 prior; give a stage-2 "
                                  "(prior) checkpoint")
        config = obj["config"]
        ema = use_ema and bool(obj.get("ema"))
        prior = found.build(config["arch"], path)
        strict_load(prior, obj["ema"]["shadow"] if ema else obj["model"], path)
        if obj.get("text_tokenizer"):  # a text prior's tokenizer travels in our checkpoints
            prior.text_tokenizer = TextTokenizer.from_state(obj["text_tokenizer"])
        defaults = {**found.sampling_defaults(config), "ema": ema}
    else:
        loaded = first_answer("prior", obj, path, tokenizer, use_ema, config_path)
        if loaded is None:
            raise CheckpointError(f"{path}: not a stage-2 checkpoint this codebase knows (ours, an official "
                                  "RQ-Transformer .pt, an official LlamaGen / NPP GPT or an "
                                  "official MAR checkpoint-last.pth)")
        prior, config, defaults = loaded
        found = prior_type_of(prior)
    del obj  # a large model's file need not stay in memory beside its weights
    found.check_tokenizer(prior, tokenizer, path, config)
    return prior.to(map_location).eval(), config, defaults


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

def sampling_knob_schemas() -> Iterable[dict[str, Knob]]:
    """The knobs of every registered prior, for the sampling scripts' flags."""
    return [p.prior_class.SAMPLING_KNOBS for p in PRIORS.values()]


def load_sampler(args: argparse.Namespace, assignments: Iterable[str], device: torch.device) -> Sampler:
    """Tokenizer (-v) and prior (-a) with the knobs of the command line, else the checkpoint's; the sampler's
    tokenizer speaks the prior's code layout (common/code_view.py); a text prior gets its text tokenizer (its
    checkpoint's, or the released vocabulary its config names, from --text-tokenizer or torch's hub cache)."""
    tokenizer, _ = load_tokenizer(args.model_vqvae_path, args.config)
    if args.image_size is not None:
        tokenizer.work_at(args.image_size, "--image-size")
    prior, config, defaults = load_prior(args.model_ar_path, tokenizer, use_ema=not args.no_ema)
    if getattr(prior, "context_length", 0):
        prior.text_tokenizer = text_tokenizer_for(prior, config, args.text_tokenizer, args.model_ar_path)
    view = view_for(tokenizer, prior)
    shape = getattr(prior, "code_shape", None)
    if args.image_size is not None and shape is not None and tuple(view.code_shape) != tuple(shape):
        raise ConfigError(f"--image-size {args.image_size}: at that size the tokenizer makes codes of shape "
                          f"{list(view.code_shape)} and the prior samples {list(shape)}; give the size it was trained "
                          f"at ({args.image_size * shape[0] // view.code_shape[0]} px)")
    return build_sampler(args, assignments, device, view, prior, defaults, args.model_ar_path)


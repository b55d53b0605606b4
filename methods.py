"""Which method handles a config or a checkpoint: the one place that knows every method package.

Entry scripts ask here for a stage-1 schema and training task, or for a tokenizer / prior
from a checkpoint file (ours, self-describing, or an official one recognised by its layout).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from common.checkpoint import is_our_checkpoint, load_file, strict_load
from common.config import Config, read_yaml, validate
from common.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Stage1Method:
    name: str
    schema: Mapping[str, Any]
    task: Callable[..., Any]  # (config, env, steps_per_epoch, vgg_weights) -> TrainTask


def stage1_config_data(raw_config: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A stage-1 YAML's data in our form: an official Open-MAGVIT2 (LightningCLI) YAML is converted, ours kept."""
    from lfq import official as lfq_official

    if lfq_official.is_lightning_config(raw_config):
        return lfq_official.stage1_config_from_official(lfq_official.parse_official_config(raw_config, path), path)
    return dict(raw_config)


def stage1_method(raw_config: Mapping[str, Any], path: str) -> Stage1Method:
    """The tokenizer family of a stage-1 config (after `stage1_config_data`), from `arch.type`."""
    arch_type = (raw_config.get("arch") or {}).get("type") if isinstance(raw_config.get("arch"), Mapping) else None
    if arch_type == "rq-vae":
        from rqvae.stage1 import STAGE1_SCHEMA, RQVAEStage1Task

        return Stage1Method("rqvae", STAGE1_SCHEMA, RQVAEStage1Task)
    if arch_type == "lfq":
        from lfq.stage1 import STAGE1_SCHEMA, LFQStage1Task

        return Stage1Method("lfq", STAGE1_SCHEMA, LFQStage1Task)
    raise ConfigError(f"{path}: arch.type must name a tokenizer this codebase trains (rq-vae, lfq), got {arch_type!r}")


@dataclass(frozen=True)
class Stage2Method:
    name: str
    schema: Mapping[str, Any]
    task: Callable[..., Any]  # (config, env, steps_per_epoch, tokenizer) -> TrainTask
    resolve_arch: Callable[..., Config]  # (config, tokenizer, source) -> the arch section filled from the tokenizer
    starting_state: Callable[[str, torch.nn.Module], dict[str, torch.Tensor]]  # -l: (path, model) -> weights


def rqtransformer_starting_state(path: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights from our checkpoint or an official stage-2 `.pt` (its `state_dict`, without the codebook)."""
    obj = load_file(path)
    if is_our_checkpoint(obj):
        return obj["model"]
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return {**obj["state_dict"], "codebook": model.codebook}  # official files leave the codebook to stage 1
    raise CheckpointError(f"{path}: not a stage-2 checkpoint (ours or an official RQ-Transformer .pt)")


def gpt_starting_state(path: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights from our checkpoint or an official LlamaGen / NPP GPT file (its `model` weights)."""
    from npp import official as npp_official

    obj = load_file(path)
    if is_our_checkpoint(obj):
        return obj["model"]
    state = npp_official.official_gpt_state(obj, use_ema=False)
    if state is None:
        raise CheckpointError(f"{path}: not a GPT checkpoint (ours or an official LlamaGen / NPP .pt)")
    return state


def stage2_method(raw_config: Mapping[str, Any], path: str) -> Stage2Method:
    """The prior family of a stage-2 config, from `arch.type`."""
    arch_type = (raw_config.get("arch") or {}).get("type") if isinstance(raw_config.get("arch"), Mapping) else None
    if arch_type == "rq-transformer":
        from rqvae.stage2 import STAGE2_SCHEMA, RQTransformerStage2Task, resolve_arch

        return Stage2Method("rq-transformer", STAGE2_SCHEMA, RQTransformerStage2Task, resolve_arch,
                            rqtransformer_starting_state)
    if arch_type == "llamagen-gpt":
        from npp.stage2 import NPP_SCHEMA, NPPStage2Task, resolve_gpt_arch

        return Stage2Method("llamagen-gpt", NPP_SCHEMA, NPPStage2Task, resolve_gpt_arch, gpt_starting_state)
    raise ConfigError(f"{path}: arch.type must name a prior this codebase trains (rq-transformer, llamagen-gpt), "
                      f"got {arch_type!r}")


def read_lfq_config(path: str) -> Config:
    """An Open-MAGVIT2 tokenizer config, official or ours, as our validated stage-1 LFQ config."""
    data = stage1_config_data(read_yaml(path), path)
    arch = data.get("arch")
    if not isinstance(arch, Mapping) or arch.get("type") != "lfq":
        raise ConfigError(f"{path}: not an Open-MAGVIT2 / LFQ tokenizer config (neither an official LightningCLI "
                          "YAML nor ours with arch.type lfq); pass the YAML released with the checkpoint")
    from lfq.stage1 import STAGE1_SCHEMA

    return validate(data, STAGE1_SCHEMA, path)


def stage1_starting_weights(obj: Any, path: str, model: torch.nn.Module,
                            use_ema: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(tokenizer weights, discriminator weights or None) to fine-tune from a loaded stage-1 checkpoint:
    ours, an official RQ-VAE `.pt` or an official Open-MAGVIT2 `.ckpt`; EMA weights where kept, unless
    `use_ema` is false."""
    from lfq import official as lfq_official
    from rqvae import official as rqvae_official

    if is_our_checkpoint(obj):
        if use_ema and obj.get("ema"):
            return obj["ema"]["shadow"], (obj.get("disc_ema") or {}).get("shadow", obj.get("discriminator"))
        return obj["model"], obj.get("discriminator")
    if lfq_official.is_official_lfq_checkpoint(obj):
        state = obj["state_dict"]
        return (lfq_official.official_generator_state(state, model, use_ema, path),
                lfq_official.official_discriminator_state(state, path, use_ema))
    if rqvae_official.is_official_rqvae_checkpoint(obj):
        return obj["state_dict"], obj.get("discriminator")
    raise CheckpointError(f"{path}: not a stage-1 checkpoint (ours, an official RQ-VAE .pt or an official "
                          "Open-MAGVIT2 .ckpt)")


def build_tokenizer_from_config(config: Mapping[str, Any]) -> torch.nn.Module:
    arch_type = config["arch"]["type"]
    if arch_type == "rq-vae":
        from rqvae.vqvae import RQVAE

        return RQVAE.from_config(config["arch"])
    if arch_type == "lfq":
        from lfq.model import LFQTokenizer

        return LFQTokenizer.from_config(config["arch"])
    if arch_type == "vq16":
        from npp.vq import VQTokenizer

        return VQTokenizer.from_config(config["arch"])
    raise CheckpointError(f"checkpoint holds a {arch_type!r} model, not a tokenizer")


def load_tokenizer(path: str, config_path: str | None = None, use_ema: bool = True,
                   map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A tokenizer in eval mode from our checkpoint or an official one; returns (model, resolved config).

    Our checkpoints carry their config; an official RQ-VAE `.pt` needs `config.yaml` beside it, an
    official Open-MAGVIT2 `.ckpt` its YAML as `config_path` (official or ours; the returned config is
    ours, so its `dataset` section serves compute_rfid.py). An official LlamaGen VQ `.pt` is rebuilt
    from its weight shapes (ImageNet at 256 px), or from `config_path` when given. EMA weights are used
    when the checkpoint has them and `use_ema` is true.
    """
    obj = load_file(path, map_location)
    if is_our_checkpoint(obj):
        model = build_tokenizer_from_config(obj["config"])
        weights = obj["ema"]["shadow"] if use_ema and obj.get("ema") else obj["model"]
        strict_load(model, weights, path)
        return model.eval(), obj["config"]
    from rqvae import official as rqvae_official

    if rqvae_official.is_official_rqvae_checkpoint(obj):
        model = rqvae_official.load_official_rqvae(path)
        return model.eval(), read_yaml(os.path.join(os.path.dirname(path), "config.yaml"))
    from lfq import official as lfq_official

    if lfq_official.is_official_lfq_checkpoint(obj):
        if config_path is None:
            raise CheckpointError(f"{path}: an Open-MAGVIT2 checkpoint needs the YAML it was trained with; "
                                  "pass it with --config (e.g. imagenet_lfqgan_256_L.yaml)")
        config = read_lfq_config(config_path)
        model = build_tokenizer_from_config(config)
        strict_load(model, lfq_official.official_generator_state(obj["state_dict"], model, use_ema, path), path)
        return model.eval(), config
    from npp import official as npp_official

    state = npp_official.official_vq_state(obj, use_ema)
    if state is not None:
        config = read_vq_config(config_path) if config_path else npp_official.vq_config_from_state(state, path)
        model = build_tokenizer_from_config(config)
        strict_load(model, state, path)
        return model.eval(), config
    raise CheckpointError(f"{path}: not a tokenizer checkpoint this codebase knows (ours, an official RQ-VAE .pt, "
                          "an official Open-MAGVIT2 .ckpt or an official LlamaGen VQ .pt)")


def read_vq_config(path: str) -> Config:
    """A LlamaGen VQ tokenizer config (ours: `arch.type: vq16`), validated."""
    from npp.schema import VQ_CONFIG

    data = read_yaml(path)
    if not isinstance(data.get("arch"), Mapping) or data["arch"].get("type") != "vq16":
        raise ConfigError(f"{path}: not a LlamaGen VQ config (arch.type must be vq16); e.g. "
                          "configs/imagenet/stage1/llamagen-vq16.yaml")
    return validate(data, VQ_CONFIG, path)


def load_prior(path: str, tokenizer: torch.nn.Module, use_ema: bool = True, config_path: str | None = None,
               map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """A stage-2 prior in eval mode for the codes of `tokenizer`; returns (prior, config, sampling defaults).

    Reads our stage-2 checkpoints, official RQ-Transformer `.pt` files (config.yaml beside them) and
    official LlamaGen / NPP GPT files. EMA weights are used when the checkpoint has them and `use_ema`
    is true. The defaults are {temperature, top_k, top_p} (the release's `sampling` section for official
    RQ-Transformers, the training config's `experiment.sample` for ours, LlamaGen's for its files) and
    `ema`, whether EMA weights were loaded. A tokenizer whose codes the prior does not model is refused.
    """
    from npp import official as npp_official
    from rqvae import official as rqvae_official

    obj = load_file(path, map_location)
    ours = is_our_checkpoint(obj)
    if (ours and obj.get("kind") == "llamagen-gpt") or (not ours and npp_official.official_gpt_state(obj)):
        return load_gpt_prior(obj, path, tokenizer, use_ema)
    if ours and obj.get("kind") != "rq-transformer":
        raise CheckpointError(f"{path}: holds a {obj.get('kind')!r} model, not a stage-2 prior")
    if not (ours or rqvae_official.is_official_rqtransformer_checkpoint(obj)):
        raise CheckpointError(f"{path}: not a stage-2 checkpoint this codebase knows (ours, an official "
                              "RQ-Transformer .pt or an official LlamaGen / NPP GPT)")
    from rqvae.transformer import RQTransformer
    from rqvae.vqvae import RQVAE

    if not isinstance(tokenizer, RQVAE):
        raise CheckpointError(f"{path}: an RQ-Transformer models the codes of an RQ-VAE, and the stage-1 model given "
                              f"is a {type(tokenizer).__name__}; pass the RQ-VAE it was trained with")
    if ours:
        config = obj["config"]
        prior = RQTransformer.from_config(config["arch"], source=path)
        ema = use_ema and bool(obj.get("ema"))
        strict_load(prior, obj["ema"]["shadow"] if ema else obj["model"], path)
        check_prior_codebook(prior, tokenizer, path, config["vqvae"].get("ckpt"))
        sample = (config.get("experiment") or {}).get("sample") or {}
        defaults = {"temperature": sample.get("temp", 1.0), "top_k": sample.get("top_k"), "top_p": sample.get("top_p")}
        return prior.eval(), config, {**defaults, "ema": ema}
    beside = rqvae_official.official_config_path(path)
    if config_path is not None and os.path.abspath(config_path) != beside:
        raise ConfigError(f"{config_path}: an official RQ-Transformer is rebuilt from the config.yaml released "
                          f"with it, which must sit at {beside}")
    ema = use_ema and isinstance(obj.get("state_dict_ema"), Mapping)
    del obj  # the loader reads the file again; do not hold two copies of a large model
    prior = rqvae_official.load_official_rqtransformer(path, tokenizer, ema=ema)
    defaults = rqvae_official.official_sampling_defaults(path)
    return prior.to(map_location), read_yaml(beside), {**defaults, "ema": ema}


def load_gpt_prior(obj: Mapping[str, Any], path: str, tokenizer: torch.nn.Module, use_ema: bool
                   ) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """`load_prior` for a LlamaGen GPT: ours (trained by main_stage2.py) or an official file."""
    from npp import official as npp_official
    from npp.gpt import GPT

    if is_our_checkpoint(obj):
        config = obj["config"]
        ema = use_ema and bool(obj.get("ema"))
        prior = GPT.from_config(config["arch"], path)
        strict_load(prior, obj["ema"]["shadow"] if ema else obj["model"], path)
        sample = config["experiment"].get("sample") or {}
    else:
        ema = use_ema and isinstance(obj.get("ema"), Mapping)
        prior, arch = npp_official.build_official_gpt(obj, path, ema)
        config = {"arch": arch}
        sample = {}  # LlamaGen samples with temperature 1, no top-k / top-p
    if len(tuple(tokenizer.code_shape)) != 2 or tokenizer.vocab_size != prior.vocab_size:
        raise CheckpointError(f"{path}: the GPT models codes of a {prior.vocab_size}-entry codebook on a square "
                              f"grid; the given stage-1 model makes codes of shape {list(tokenizer.code_shape)} "
                              f"from {tokenizer.vocab_size} entries; pass the tokenizer it was trained with")
    defaults = {"temperature": sample.get("temperature", 1.0), "top_k": sample.get("top_k"),
                "top_p": sample.get("top_p"), "ema": ema}
    return prior.eval(), config, defaults


@torch.no_grad()
def check_prior_codebook(prior: torch.nn.Module, tokenizer: torch.nn.Module, path: str, trained_with: str | None
                         ) -> None:
    """Our priors keep the codebook they were trained on: the tokenizer must have the same one."""
    if not hasattr(prior, "codebook"):  # a prior with token tables of its own: only the code shape must agree
        found = (tokenizer.vocab_size, tuple(tokenizer.code_shape))
        if found != (prior.vocab_size, prior.block_size):
            raise CheckpointError(f"{path}: the prior models {prior.vocab_size} codes of shape "
                                  f"{list(prior.block_size)}, the given stage-1 model makes {found[0]} codes of "
                                  f"shape {list(found[1])}")
        return
    saved = prior.codebook.clone()
    prior.set_codebook_from(tokenizer, source=f"{path} with the given stage-1 model")
    if not torch.equal(saved, prior.codebook.to(saved.device)):
        raise CheckpointError(f"{path}: the prior was trained on the codes of another RQ-VAE (its codebook differs "
                              f"from the given stage-1 model's); pass the stage-1 checkpoint it was trained with"
                              + (f" ({trained_with})" if trained_with else ""))

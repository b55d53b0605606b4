"""Official kakaobrain/rq-vae-transformer checkpoints: recognising, loading and writing their layout.

An official `.pt` is a dict whose `state_dict` holds the model weights under the same names as
ours (a shared codebook listed once per depth); the model is rebuilt from the `arch` section of
the `config.yaml` that must sit in the same directory. A stage-2 (RQ-Transformer) file lacks the
codebook its inputs are made of: it is taken from the paired stage-1 model. Text-to-image releases
(CC-3M: `dataset.dataset: cc3m`, `txt_tok_name`, `context_length` in config.yaml) load the same way; their
text tokenizer is the released vocabulary the config names (common/text_tokenizer.py).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch
from torch import nn

from common.checkpoint import load_file, strict_load
from common.config import read_yaml, save_config
from common.errors import CheckpointError, ConfigError
from rqvae.transformer import RQTransformer
from rqvae.vqvae import RQVAE


def is_official_rqvae_checkpoint(obj: Any) -> bool:
    """True for an official stage-1 file: a dict with a `state_dict` of encoder./quantizer. weights."""
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    return isinstance(state, Mapping) and any(k.startswith("encoder.") for k in state) \
        and any(k.startswith("quantizer.") for k in state)


def official_config_path(pt_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(pt_path)), "config.yaml")


def read_official_config(pt_path: str, kind: str) -> tuple[dict[str, Any], str]:
    """The config.yaml beside an official `.pt` and its path; it must exist and have an `arch` section."""
    config_path = official_config_path(pt_path)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{pt_path}: official checkpoints are rebuilt from the config.yaml released with them; "
                              f"put it at {config_path}")
    config = read_yaml(config_path)
    if not isinstance(config.get("arch"), Mapping):
        raise CheckpointError(f"{config_path}: no 'arch' section; is this the {kind} config.yaml of the checkpoint?")
    return config, config_path


def read_official_files(pt_path: str, recognise: Callable[[Any], bool], kind: str, weights: str
                        ) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(checkpoint, config, config path) of an official `.pt` of `kind`; anything else is a CheckpointError."""
    ckpt = load_file(pt_path)
    if not recognise(ckpt):
        raise CheckpointError(f"{pt_path}: not an official {kind} checkpoint "
                              f"(expected a dict with a 'state_dict' of {weights} weights)")
    config, config_path = read_official_config(pt_path, kind)
    return ckpt, config, config_path


def load_official_rqvae(pt_path: str) -> RQVAE:
    """An RQ-VAE with the weights of an official `.pt`, built from `config.yaml` beside it."""
    ckpt, config, config_path = read_official_files(pt_path, is_official_rqvae_checkpoint, "RQ-VAE stage-1",
                                                   "encoder./quantizer.")
    model = RQVAE.from_config(config["arch"], source=config_path)
    state = ckpt["state_dict"]
    check_shared_codebook_copies(model, state, pt_path)
    strict_load(model, state, pt_path)
    return model


def check_shared_codebook_copies(model: RQVAE, state: Mapping[str, torch.Tensor], source: str) -> None:
    """A shared codebook is stored once per depth; the copies must agree (loading keeps only the last)."""
    if not model.quantizer.shared_codebook:
        return
    for name in ("weight", "cluster_size_ema", "embed_ema"):
        copies = [state.get(f"quantizer.codebooks.{d}.{name}") for d in range(model.code_shape[2])]
        if any(c is None or c.shape != copies[0].shape for c in copies):
            continue  # strict_load reports missing or mis-shaped keys
        if any(not torch.equal(c, copies[0]) for c in copies[1:]):
            raise CheckpointError(f"{source}: the copies quantizer.codebooks.*.{name} of the shared codebook differ; "
                                  "the config says shared_codebook: true but the weights are not shared")


def official_discriminator_state(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The PatchGAN weights of an official stage-1 training checkpoint, for fine-tuning."""
    state = ckpt.get("discriminator")
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError("official checkpoint has no 'discriminator' weights "
                              "(only stage-1 training checkpoints carry them); fine-tune without them")
    return dict(state)


def export_official_rqvae(model: RQVAE, config_arch: Mapping[str, Any], pt_path: str,
                          discriminator: nn.Module | None = None, epoch: int = 0) -> None:
    """Write `pt_path` and `config.yaml` beside it in the official layout (readable by the official code)."""
    directory = os.path.dirname(os.path.abspath(pt_path))
    os.makedirs(directory, exist_ok=True)
    ckpt: dict[str, Any] = {"epoch": epoch, "state_dict": model.state_dict()}  # D copies of a shared codebook
    if discriminator is not None:
        ckpt["discriminator"] = discriminator.state_dict()
    tmp = f"{pt_path}.tmp{os.getpid()}"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, pt_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    save_config({"arch": config_arch}, official_config_path(pt_path))


# ----------------------------------------------------------------------------------------------
# Stage 2: RQ-Transformer
# ----------------------------------------------------------------------------------------------

def is_official_rqtransformer_checkpoint(obj: Any) -> bool:
    """True for an official stage-2 file: a dict with a `state_dict` of body_transformer. weights."""
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    return isinstance(state, Mapping) and any(k.startswith("body_transformer.") for k in state)


def load_official_rqtransformer(pt_path: str, rqvae: RQVAE, ema: bool = False) -> RQTransformer:
    """The RQ-Transformer of an official stage-2 `.pt` in eval mode: `state_dict` (or `state_dict_ema`
    with `ema`), built from the config.yaml beside it, with the codebook of `rqvae`, the paired stage-1 model."""
    ckpt, config, config_path = read_official_files(pt_path, is_official_rqtransformer_checkpoint,
                                                   "RQ-Transformer stage-2", "body_transformer.")
    return build_official_rqtransformer(ckpt, config, config_path, pt_path, rqvae, ema)


def build_official_rqtransformer(ckpt: Mapping[str, Any], config: Mapping[str, Any], config_path: str, pt_path: str,
                                 rqvae: RQVAE, ema: bool) -> RQTransformer:
    model = RQTransformer.from_config(config["arch"], source=config_path)
    context = (config.get("dataset") or {}).get("context_length")
    if model.context_length and context not in (None, model.context_length):
        raise CheckpointError(f"{config_path}: dataset.context_length {context} (the tokenizer's) and "
                              f"arch.block_size_cond {model.context_length} (the model's) must be equal")
    model.set_codebook_from(rqvae, source=f"{pt_path} with the given stage-1 model")
    key = "state_dict_ema" if ema else "state_dict"
    if not isinstance(ckpt.get(key), Mapping):
        raise CheckpointError(f"{pt_path}: has no '{key}' (EMA weights); load it without --ema")
    state = dict(ckpt[key])
    if hasattr(model, "codebook"):
        state["codebook"] = model.codebook  # not in official files: the codebook lives in the stage-1 model
    strict_load(model, state, pt_path)
    return model.eval()


def official_sampling_defaults(pt_path: str) -> dict[str, Any]:
    """`temperature`, `top_k`, `top_p` of a released stage-2 config.yaml (its `sampling` section, else
    `experiment.sample`); temperature 1.0 and top_k / top_p None where the file gives none."""
    config, _ = read_official_config(pt_path, "RQ-Transformer stage-2")
    sampling = config.get("sampling") or {}
    experiment_sample = (config.get("experiment") or {}).get("sample") or {}
    return {"temperature": sampling.get("temp", 1.0),
            "top_k": sampling.get("top_k", experiment_sample.get("top_k")),
            "top_p": sampling.get("top_p", experiment_sample.get("top_p"))}


# ----------------------------------------------------------------------------------------------
# The hooks of the method record (rqvae/method.py)
# ----------------------------------------------------------------------------------------------

def official_tokenizer(obj: Any, path: str, config_path: str | None, use_ema: bool
                       ) -> tuple[RQVAE, dict[str, Any]] | None:
    """An official stage-1 `.pt` as (RQ-VAE, the config.yaml beside it); official files keep no EMA."""
    if not is_official_rqvae_checkpoint(obj):
        return None
    return load_official_rqvae(path).eval(), read_yaml(official_config_path(path))


def official_tokenizer_weights(obj: Any, path: str, model: nn.Module, use_ema: bool
                               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None] | None:
    if not is_official_rqvae_checkpoint(obj):
        return None
    return obj["state_dict"], obj.get("discriminator")


def official_prior(obj: Any, path: str, tokenizer: nn.Module, use_ema: bool, config_path: str | None
                   ) -> tuple[RQTransformer, dict[str, Any], dict[str, Any]] | None:
    """An official stage-2 `.pt` (config.yaml beside it) on the paired RQ-VAE, with the release's
    sampling settings as knob defaults; EMA weights when the file has them and `use_ema`."""
    if not is_official_rqtransformer_checkpoint(obj):
        return None
    if not isinstance(tokenizer, RQVAE):
        raise CheckpointError(f"{path}: an RQ-Transformer models the codes of an RQ-VAE, and the stage-1 model given "
                              f"is a {type(tokenizer).__name__}; pass the RQ-VAE it was trained with")
    config, beside = read_official_config(path, "RQ-Transformer stage-2")
    if config_path is not None and os.path.abspath(config_path) != beside:
        raise ConfigError(f"{config_path}: an official RQ-Transformer is rebuilt from the config.yaml released "
                          f"with it, which must sit at {beside}")
    ema = use_ema and isinstance(obj.get("state_dict_ema"), Mapping)
    prior = build_official_rqtransformer(obj, config, beside, path, tokenizer, ema)
    return prior, config, {**official_sampling_defaults(path), "ema": ema}


def official_prior_weights(obj: Any, path: str, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The weights of an official stage-2 `.pt` with the prior's codebook (official files leave it to stage 1)."""
    if not is_official_rqtransformer_checkpoint(obj):
        return None
    state = dict(obj["state_dict"])
    if hasattr(model, "codebook"):
        state["codebook"] = model.codebook
    return state

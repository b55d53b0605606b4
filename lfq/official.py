"""Official Open-MAGVIT2 checkpoints: Lightning `.ckpt` files plus the YAML they were trained with.

The Lightning `state_dict` holds the raw (last-step) weights under `encoder.*` / `decoder.*`,
the loss modules under `loss.*` (LPIPS, PatchGAN `loss.discriminator.*`) and an EMA copy of
every trainable parameter as `model_ema.<full name without dots>`. The official evaluation
runs with the EMA weights, so they are taken by default wherever present.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from common.checkpoint import load_file, strict_load
from common.config import Config, read_yaml, validate
from common.errors import CheckpointError, ConfigError
from lfq.model import LFQTokenizer
from lfq.schema import OFFICIAL_MODEL_CLASS, OPENMAGVIT2_SCHEMA

GENERATOR_PREFIXES = ("encoder.", "decoder.")
DISCRIMINATOR_PREFIX = "loss.discriminator."


def ema_key(name: str) -> str:
    """The EMA buffer of parameter `name`: `encoder.down.0.block.1.conv1.weight` -> `model_ema.encoderdown0block1conv1weight`."""
    return "model_ema." + name.replace(".", "")


# ----------------------------------------------------------------------------------------------
# The YAML
# ----------------------------------------------------------------------------------------------

def is_lightning_config(raw: Mapping[str, Any]) -> bool:
    """True for a LightningCLI YAML (`model.class_path`), the form of every Open-MAGVIT2 config."""
    return isinstance(raw.get("model"), Mapping) and "class_path" in raw["model"]


def parse_official_config(raw: Mapping[str, Any], source: str) -> Config:
    """Validate the data of an official tokenizer YAML; any other config is a ConfigError."""
    model = raw.get("model")
    class_path = model.get("class_path") if isinstance(model, Mapping) else None
    if class_path != OFFICIAL_MODEL_CLASS:
        raise ConfigError(f"{source}: not an Open-MAGVIT2 tokenizer config (model.class_path must be "
                          f"{OFFICIAL_MODEL_CLASS}, got {class_path!r}); pass the YAML released with the checkpoint")
    return validate(raw, OPENMAGVIT2_SCHEMA, source)


def read_official_config(path: str) -> Config:
    """Read and validate an official tokenizer YAML; any other YAML is a ConfigError."""
    return parse_official_config(read_yaml(path), path)


def official_image_size(config: Mapping[str, Any]) -> int | None:
    """The evaluation image size of an official config (`data.init_args.<split>.params.config.size`)."""
    data = config.get("data")
    splits = data.get("init_args") if isinstance(data, Mapping) else None
    for split in ("test", "validation", "train"):
        node: Any = splits.get(split) if isinstance(splits, Mapping) else None
        for key in ("params", "config", "size"):
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, int) and not isinstance(node, bool):
            return node
    return None


def arch_from_official(config: Mapping[str, Any], source: str, image_size: int | None = None) -> dict[str, Any]:
    """Our `arch` section (lfq/schema.py LFQ_ARCH) from a validated official config.

    The image size is `image_size` if given, else the data section's (`ddconfig.resolution`
    is a leftover in the official 256 config and is not used).
    """
    args = config["model"]["init_args"]
    image_size = image_size or official_image_size(config)
    if image_size is None:
        raise ConfigError(f"{source}: no data.init_args.<split>.params.config.size to take the image size from; "
                          "give the image size explicitly")
    return {"type": "lfq", "image_size": image_size, "ddconfig": dict(args["ddconfig"]),
            "n_embed": args["n_embed"], "embed_dim": args["embed_dim"],
            "sample_minimization_weight": args["sample_minimization_weight"],
            "batch_maximization_weight": args["batch_maximization_weight"]}


def stage1_config_from_official(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Our stage-1 LFQ config (lfq/stage1.py STAGE1_SCHEMA) carrying every training value of an official YAML.

    Lightning's trainer becomes `experiment` (epochs, validation and log frequency, AMP, the
    global batch), `lossconfig.params` becomes `loss` (same names), the data section an
    ImageNet `dataset` with the official transform (Resize + RandomCrop, no flip; the file
    lists of `subset` are not read). Both Adam optimizers use betas (0.5, 0.9) and a constant
    lr with the `lr_drop_epoch` steps (the official `scheduler_type` schedulers are never
    stepped); `resume_lr` is not carried (override `optimizer.init_lr` instead). A missing
    `learning_rate` becomes the released 1e-4.
    """
    trainer, args = config["trainer"], config["model"]["init_args"]
    arch = arch_from_official(config, source)
    data_args = config["data"].get("init_args", {}) if isinstance(config["data"], Mapping) else {}
    batch_size = data_args.get("batch_size", 8)
    processes = [n for n in (trainer["devices"], trainer["num_nodes"]) if isinstance(n, int)]
    seed = config["seed_everything"]
    return {
        "arch": arch,
        "dataset": {"type": "imagenet", "transforms": {"type": "openmagvit2"}, "resolution": arch["image_size"]},
        "optimizer": {"type": "adam", "init_lr": args["learning_rate"] or 1e-4, "betas": [0.5, 0.9],
                      "warmup": {"epoch": 0.0, "decay": "constant"},
                      "lr_drop_epoch": args["lr_drop_epoch"], "lr_drop_rate": args["lr_drop_rate"]},
        "experiment": {"batch_size": batch_size, "epochs": trainer["max_epochs"] or 1000,  # Lightning's default
                       "test_freq": trainer["check_val_every_n_epoch"], "log_every": trainer["log_every_n_steps"],
                       "amp": str(trainer["precision"]).endswith("-mixed"),
                       "total_batch_size": batch_size * math.prod(processes) if len(processes) == 2 else None,
                       "num_workers": data_args.get("num_workers", 0)},
        "loss": dict(args["lossconfig"]["params"]),
        "ema": {"use_ema": args["use_ema"]},
        "seed": seed if isinstance(seed, int) and not isinstance(seed, bool) else 0,
    }


# ----------------------------------------------------------------------------------------------
# The checkpoint
# ----------------------------------------------------------------------------------------------

def is_official_lfq_checkpoint(obj: Any) -> bool:
    """True for an Open-MAGVIT2 Lightning checkpoint: a `state_dict` with the adaptive-norm decoder."""
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    return isinstance(state, Mapping) and "encoder.conv_in.weight" in state \
        and any(k.startswith("decoder.adaptive.") for k in state)


def read_lightning_state(ckpt_path: str) -> dict[str, torch.Tensor]:
    """The `state_dict` of an official Lightning checkpoint (read as data only)."""
    ckpt = load_file(ckpt_path)
    if not is_official_lfq_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt_path}: not an Open-MAGVIT2 tokenizer checkpoint (expected a Lightning .ckpt "
                              "whose state_dict holds encoder.* and decoder.adaptive.* weights)")
    return ckpt["state_dict"]


def official_generator_state(state: Mapping[str, torch.Tensor], model: LFQTokenizer, use_ema: bool,
                             source: str) -> dict[str, torch.Tensor]:
    """Encoder/decoder weights in our names, each from its EMA copy when `use_ema` and present."""
    conv_out = state.get("encoder.conv_out.weight")
    bits = conv_out.shape[0] if conv_out is not None else model.num_bits  # if absent, strict_load names it
    if bits != model.num_bits:
        raise CheckpointError(f"{source}: the checkpoint has {bits}-bit codes (encoder.conv_out has {bits} output "
                              f"channels) but its config says {model.num_bits} bits (embed_dim); "
                              "pass the YAML released with this checkpoint")
    weights = {k: v for k, v in state.items() if k.startswith(GENERATOR_PREFIXES)}
    if use_ema:
        for name in model.state_dict():
            if ema_key(name) in state:
                weights[name] = state[ema_key(name)]
    return weights


def official_discriminator_state(state: Mapping[str, torch.Tensor], source: str,
                                 use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The PatchGAN weights (`main.*` names) for fine-tuning; raw by default, EMA parameters if asked
    (BatchNorm statistics are not averaged, so they stay raw)."""
    weights = {k[len(DISCRIMINATOR_PREFIX):]: v for k, v in state.items() if k.startswith(DISCRIMINATOR_PREFIX)}
    if not weights:
        raise CheckpointError(f"{source}: no loss.discriminator.* weights in the checkpoint; fine-tune without them")
    if use_ema:
        for name in weights:
            weights[name] = state.get(ema_key(DISCRIMINATOR_PREFIX + name), weights[name])
    return weights


def load_official_lfq(ckpt_path: str, config_path: str, use_ema: bool = True,
                      image_size: int | None = None) -> LFQTokenizer:
    """An LFQTokenizer in eval mode with the weights of an official `.ckpt`, built from its official YAML.

    `loss.*` and `model_ema.decay` / `num_updates` are ignored; missing, unexpected or mis-shaped
    encoder/decoder weights are a CheckpointError listing them.
    """
    config = read_official_config(config_path)
    arch = arch_from_official(config, config_path, image_size)
    return tokenizer_from_state(read_lightning_state(ckpt_path), arch, ckpt_path, use_ema, config_path)


def tokenizer_from_state(state: Mapping[str, torch.Tensor], arch: Mapping[str, Any], path: str, use_ema: bool,
                         config_path: str) -> LFQTokenizer:
    model = LFQTokenizer.from_config(arch, source=config_path)
    strict_load(model, official_generator_state(state, model, use_ema, path), path)
    return model.eval()


def read_lfq_config(path: str) -> Config:
    """An Open-MAGVIT2 tokenizer config, official or ours, as our validated stage-1 LFQ config."""
    from lfq.stage1 import STAGE1_SCHEMA

    raw = read_yaml(path)
    data = official_stage1_config(raw, path) or raw
    arch = data.get("arch")
    if not isinstance(arch, Mapping) or arch.get("type") != "lfq":
        raise ConfigError(f"{path}: not an Open-MAGVIT2 / LFQ tokenizer config (neither an official LightningCLI "
                          "YAML nor ours with arch.type lfq); pass the YAML released with the checkpoint")
    return validate(data, STAGE1_SCHEMA, path)


# ----------------------------------------------------------------------------------------------
# The hooks of the method record (lfq/method.py)
# ----------------------------------------------------------------------------------------------

def official_stage1_config(raw: Mapping[str, Any], path: str) -> dict[str, Any] | None:
    """An official LightningCLI YAML as our stage-1 config data."""
    if not is_lightning_config(raw):
        return None
    return stage1_config_from_official(parse_official_config(raw, path), path)


def official_tokenizer(obj: Any, path: str, config_path: str | None, use_ema: bool
                       ) -> tuple[LFQTokenizer, Config] | None:
    """An official `.ckpt` with the YAML it was trained with (official or ours); EMA weights by default."""
    if not is_official_lfq_checkpoint(obj):
        return None
    if config_path is None:
        raise CheckpointError(f"{path}: an Open-MAGVIT2 checkpoint needs the YAML it was trained with; "
                              "pass it with --config (e.g. imagenet_lfqgan_256_L.yaml)")
    config = read_lfq_config(config_path)
    return tokenizer_from_state(obj["state_dict"], config["arch"], path, use_ema, config_path), config


def official_tokenizer_weights(obj: Any, path: str, model: LFQTokenizer, use_ema: bool
                               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    if not is_official_lfq_checkpoint(obj):
        return None
    if not isinstance(model, LFQTokenizer):
        raise CheckpointError(f"{path}: an Open-MAGVIT2 tokenizer, and the config trains a {type(model).__name__}; "
                              "-l takes a checkpoint of the config's tokenizer")
    state = obj["state_dict"]
    return official_generator_state(state, model, use_ema, path), official_discriminator_state(state, path, use_ema)

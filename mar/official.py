"""Official LTH14/mar files: recognising and loading their layouts.

VAE (`kl16.ckpt`): `{"model": state_dict}` with the weights of the KL-16 VAE under the same names
as ours (`encoder.`, `decoder.`, `quant_conv.`, `post_quant_conv.`). No config travels with it: the
widths, levels, blocks per level and where attention sits are read off the weight shapes; the
image size, which a convolutional model does not record, defaults to 256 (it places the
attention levels and sets the token grid, not the numbers), and the latent scale is MAR's 0.2325.

MAR (`checkpoint-last.pth` of the training loop, also the released MAR-B/L/H files): `model` and
`model_ema` (the same keys, EMA values; inference uses it), and any of `optimizer`, `epoch`,
`scaler`, `args` (an argparse.Namespace, let through `weights_only` loading as plain data). The
model is rebuilt from `args` (`args.model` a released name, plus the flags the official script
passes to it); a model of another name needs its `arch` from the caller, because head counts
cannot be read off the weights.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from common.checkpoint import is_our_checkpoint, load_file, strict_load
from common.config import Config, read_yaml, validate
from common.errors import CheckpointError
from mar.model import MAR, MAR_MODELS
from mar.schema import MAR_ARCH, VAE_CONFIG
from mar.vae import KLVAE, read_vae_config

VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def official_vae_state(obj: Any) -> dict[str, torch.Tensor] | None:
    """The VAE weights of a loaded kl16.ckpt-style file (its `model`, or the bare state dict), or None when
    the object is not one."""
    if not isinstance(obj, Mapping) or is_our_checkpoint(obj):
        return None
    state = obj.get("model", obj)
    if not isinstance(state, Mapping) or not state or not all(isinstance(k, str) for k in state):
        return None
    if not all(k.startswith(VAE_PREFIXES) for k in state) or not all(
            any(k.startswith(p) for k in state) for p in VAE_PREFIXES):
        return None
    return dict(state)


def _run_length(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """How many keys `pattern.format(0)`, `pattern.format(1)`, ... the state dict has in a row."""
    n = 0
    while pattern.format(n) in state:
        n += 1
    return n


def vae_arch_from_state(state: Mapping[str, torch.Tensor], source: str, resolution: int = 256) -> dict[str, Any]:
    """The `arch` section (mar/schema.py) of the KL-VAE whose weights these are, for images of `resolution`."""
    try:
        ch = state["encoder.conv_in.weight"].shape[0]
        levels = _run_length(state, "encoder.down.{}.block.0.conv1.weight")
        widths = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
        embed_dim = state["post_quant_conv.weight"].shape[1]
        z_channels = state["decoder.conv_in.weight"].shape[1]
        encoder_out = state["encoder.conv_out.weight"].shape[0]
        in_channels = state["encoder.conv_in.weight"].shape[1]
        out_ch = state["decoder.conv_out.weight"].shape[0]
    except KeyError as missing:
        raise CheckpointError(f"{source}: not a complete KL-VAE state dict (no {missing})") from None
    if levels == 0 or any(w % ch for w in widths):
        raise CheckpointError(f"{source}: cannot read the VAE's levels off its weights (base width {ch}, "
                              f"level widths {widths})")
    # level i works at resolution / 2^i; a level with attention has `attn.0`
    attention = {part: [resolution // 2 ** i for i in range(levels) if f"{part}.{i}.attn.0.q.weight" in state]
                 for part in ("encoder.down", "decoder.up")}
    return {
        "type": "kl-vae", "embed_dim": embed_dim, "z_channels": z_channels, "double_z": encoder_out == 2 * z_channels,
        "ch": ch, "ch_mult": [w // ch for w in widths],
        "num_res_blocks": _run_length(state, "encoder.down.0.block.{}.conv1.weight"),
        "resolution": resolution, "in_channels": in_channels, "out_ch": out_ch,
        "encoder_attn_resolutions": attention["encoder.down"], "decoder_attn_resolutions": attention["decoder.up"],
    }


def vae_config_from_state(state: Mapping[str, torch.Tensor], source: str, resolution: int = 256) -> Config:
    """The config of a released VAE file: its arch from the weights, ImageNet at `resolution` (MAR's data)."""
    data = {"arch": vae_arch_from_state(state, source, resolution),
            "dataset": {"type": "imagenet", "resolution": resolution}}
    return validate(data, VAE_CONFIG, source)


def load_official_vae(path: str, config_path: str | None = None, resolution: int = 256) -> tuple[KLVAE, Config]:
    """The KL-VAE of a kl16.ckpt-style file in eval mode, and its config: from `config_path` (ours,
    `arch.type: kl-vae`) when given, else read off the weights for images of `resolution`."""
    state = official_vae_state(load_file(path))
    if state is None:
        raise CheckpointError(f"{path}: not an official MAR KL-VAE checkpoint (expected kl16.ckpt's layout: "
                              f"{{'model': state dict}} of {', '.join(p.rstrip('.') for p in VAE_PREFIXES)} weights)")
    return vae_from_state(state, path, config_path, resolution)


def vae_from_state(state: Mapping[str, torch.Tensor], path: str, config_path: str | None = None,
                   resolution: int = 256) -> tuple[KLVAE, Config]:
    config = read_vae_config(config_path) if config_path else vae_config_from_state(state, path, resolution)
    model = KLVAE.from_config(config["arch"], path)
    strict_load(model, state, path)
    return model.eval(), config


# ----------------------------------------------------------------------------------------------
# MAR training checkpoints
# ----------------------------------------------------------------------------------------------

MAR_SIGNATURE = ("fake_latent", "encoder_pos_embed_learned", "mask_token", "diffloss.net.input_proj.weight")
# the flags of the official training script that it passes to the model constructor
MAR_ARGS = ("img_size", "vae_stride", "patch_size", "vae_embed_dim", "mask_ratio_min", "label_drop_prob", "class_num",
            "attn_dropout", "proj_dropout", "buffer_size", "diffloss_d", "diffloss_w", "num_sampling_steps",
            "diffusion_batch_mul", "grad_checkpointing")


def official_mar_state(obj: Any, use_ema: bool = True) -> dict[str, torch.Tensor] | None:
    """The MAR weights of a loaded official checkpoint (`model_ema` when present and `use_ema`, else
    `model`), or None when the object is not one."""
    if not isinstance(obj, Mapping) or is_our_checkpoint(obj):
        return None
    for key in (("model_ema", "model") if use_ema else ("model",)):
        state = obj.get(key)
        if isinstance(state, Mapping) and all(k in state for k in MAR_SIGNATURE):
            return dict(state)
    return None


def mar_arch_from_args(args: Any, source: str, arch: Mapping[str, Any] | None = None) -> Config:
    """The `arch` section (mar/schema.py) of an official run: its `args` (a Namespace or a mapping) for the
    constructor flags and, when `args.model` is a released name, the model's; then `arch`, which wins."""
    flags = vars(args) if hasattr(args, "__dict__") else dict(args or {})
    data = {key: flags[key] for key in MAR_ARGS if flags.get(key) is not None}
    name = flags.get("model")
    if name in MAR_MODELS:
        data["model"] = name
    elif arch is None:
        known = f"model {name!r} is not a released MAR" if name else "no `args` with the model name"
        raise CheckpointError(f"{source}: {known} ({', '.join(MAR_MODELS)}); pass its arch (widths, depths, heads), "
                              "which cannot be read off the weights")
    return validate({"type": "mar", **data, **(arch or {})}, MAR_ARCH, source, prefix="arch.")


def load_official_mar(path: str, use_ema: bool = True, arch: Mapping[str, Any] | None = None
                      ) -> tuple[MAR, Config]:
    """The MAR model of an official training checkpoint in eval mode (EMA weights unless `use_ema` is False),
    and its arch section: from the file's `args`, with `arch` (mar/schema.py keys) overriding them."""
    obj = load_file(path)
    state = official_mar_state(obj, use_ema)
    if state is None:
        raise CheckpointError(f"{path}: not an official MAR checkpoint (expected checkpoint-last.pth's layout: "
                              "'model' / 'model_ema' state dicts of a MAR)")
    config = mar_arch_from_args(obj.get("args"), path, arch)
    model = MAR.from_config(config, path)
    strict_load(model, state, path)
    return model.eval(), config


# ----------------------------------------------------------------------------------------------
# The hooks of the method record (mar/method.py)
# ----------------------------------------------------------------------------------------------

def official_tokenizer(obj: Any, path: str, config_path: str | None, use_ema: bool) -> tuple[KLVAE, Config] | None:
    """A kl16.ckpt-style VAE (it keeps no EMA), rebuilt from its weights or from `config_path`."""
    state = official_vae_state(obj)
    return None if state is None else vae_from_state(state, path, config_path)


def official_prior(obj: Any, path: str, tokenizer: Any, use_ema: bool, config_path: str | None
                   ) -> tuple[MAR, dict[str, Any], dict[str, Any]] | None:
    """An official MAR checkpoint, built from its `args` (or the `arch` of our config at `config_path`, for
    a model of no released name); the sampling flags of its run are the knob defaults."""
    state = official_mar_state(obj, use_ema)
    if state is None:
        return None
    arch = read_yaml(config_path).get("arch") if config_path else None
    config = mar_arch_from_args(obj.get("args"), path, arch)
    model = MAR.from_config(config, path)
    strict_load(model, state, path)
    flags = vars(obj["args"]) if hasattr(obj.get("args"), "__dict__") else dict(obj.get("args") or {})
    defaults = {name: flags[name] for name in MAR.SAMPLING_KNOBS if flags.get(name) is not None}
    return model.eval(), {"arch": config}, {**defaults, "ema": use_ema and isinstance(obj.get("model_ema"), Mapping)}


def official_prior_weights(obj: Any, path: str, model: MAR) -> dict[str, torch.Tensor] | None:
    return official_mar_state(obj, use_ema=False)

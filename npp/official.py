"""Official LlamaGen / NPP files: recognising and loading their layouts.

Tokenizer (`vq_ds16_c2i.pt`): a dict whose `model` (and, from the VQ trainer with EMA, `ema`) holds
the `VQModel` state dict under the same names as ours, or that bare state dict. No config travels
with it: the widths, the number of levels and the codebook are read off the weight shapes, the
image size (not recoverable from a convolutional model) defaults to 256. A training checkpoint of
`vq_train.py` (`model`, `optimizer`, `discriminator`, `optimizer_disc`, `steps`, `args`) is a
fine-tuning start for main_stage1.py -l: its tokenizer and discriminator weights.

GPT (`c2i_B_256.pt`, ...): `{"model", "optimizer", "steps", "args"}` as the training script writes
it (`args`, an argparse.Namespace, is let through `weights_only` loading as plain data), `ema`
when trained with it, or a bare state dict (the FSDP-saved XXL and 3B releases). Width, depth,
vocabulary and classes come from the weights; the heads from the caller, the model name in `args`
or the preset of that width and depth; the code grid from the caller or `args` (image_size /
downsample_size), and for the samplers from the tokenizer when the file has no `args`.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import torch

from common.checkpoint import load_file, strict_load
from common.config import Config, read_yaml, validate
from common.errors import CheckpointError, ConfigError
from npp.gpt import GPT
from npp.schema import GPT_PRESETS, VQ_CONFIG
from npp.stage1 import STAGE1_SCHEMA
from npp.stage2 import square_grid
from npp.vq import VQTokenizer

SIGNATURE = ("quantize.embedding.weight", "encoder.conv_blocks.0.res.0.conv1.weight")


def official_vq_state(obj: Any, use_ema: bool = True) -> dict[str, torch.Tensor] | None:
    """The VQModel weights of a loaded official file (its `ema` when present and `use_ema`), or None
    when the object is not one."""
    if not isinstance(obj, Mapping):
        return None
    for key in (("ema", "model") if use_ema else ("model",)):
        state = obj.get(key)
        if isinstance(state, Mapping) and all(k in state for k in SIGNATURE):
            return dict(state)
    return dict(obj) if all(k in obj for k in SIGNATURE) else None


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """How many distinct indices fill the `{}` of `pattern` in the state-dict keys."""
    regex = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))
    return len({m.group(1) for k in state if (m := regex.match(k))})


def vq_arch_from_state(state: Mapping[str, torch.Tensor], source: str, image_size: int = 256) -> dict[str, Any]:
    """The `arch` section (npp/schema.py) of the VQ model whose weights these are."""
    try:
        ch = state["encoder.conv_in.weight"].shape[0]
        levels = _count(state, "encoder.conv_blocks.{}.res.0.conv1.weight")
        encoder_widths = [state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] for i in range(levels)]
        decoder_widths = [state[f"decoder.conv_blocks.{j}.res.0.conv1.weight"].shape[0] for j in range(levels)]
        codebook_size, dim = state["quantize.embedding.weight"].shape
        z_channels = state["encoder.conv_out.weight"].shape[0]
    except KeyError as missing:
        raise CheckpointError(f"{source}: not a complete LlamaGen VQ state dict (no {missing})") from None
    return {
        "type": "vq16", "codebook_size": codebook_size, "codebook_embed_dim": dim,
        "encoder_ch_mult": [w // ch for w in encoder_widths],
        "decoder_ch_mult": [w // ch for w in reversed(decoder_widths)],  # decoder stage 0 is the deepest level
        "z_channels": z_channels, "ch": ch,
        "num_res_blocks": _count(state, "encoder.conv_blocks.0.res.{}.conv1.weight"),
        "image_size": image_size,
    }


def vq_config_from_state(state: Mapping[str, torch.Tensor], source: str) -> Config:
    """The config of a released tokenizer file: its arch from the weights, ImageNet at 256 px (LlamaGen's)."""
    data = {"arch": vq_arch_from_state(state, source), "dataset": {"type": "imagenet", "resolution": 256}}
    return validate(data, VQ_CONFIG, source)


GPT_SIGNATURE = ("tok_embeddings.weight", "cls_embedding.embedding_table.weight", "output.weight")
COMPUTED_KEYS = re.compile(r"(^|\.)(freqs_cis|kv_cache\.[kv]_cache)$")  # tables and caches, rebuilt on load


def official_gpt_state(obj: Any, use_ema: bool = True) -> dict[str, torch.Tensor] | None:
    """The GPT weights of a loaded official file (its `ema` when present and `use_ema`), without the
    computed tables some files carry; None when the object is not one."""
    if not isinstance(obj, Mapping):
        return None
    candidates = [obj.get(key) for key in (("ema", "model", "module", "state_dict") if use_ema
                                           else ("model", "module", "state_dict"))] + [obj]
    for state in candidates:
        if isinstance(state, Mapping) and all(k in state for k in GPT_SIGNATURE):
            return {k: v for k, v in state.items() if not COMPUTED_KEYS.search(k)}
    return None


def gpt_arch_from_state(state: Mapping[str, torch.Tensor], source: str, args: Any = None,
                        n_head: int | None = None, image_tokens: int | None = None) -> dict[str, Any]:
    """The `arch` section (npp/schema.py) of the GPT whose weights these are."""
    vocab_size, dim = state["tok_embeddings.weight"].shape
    n_layer = _count(state, "layers.{}.attention.wqkv.weight")
    model_name = getattr(args, "gpt_model", None)
    if n_head is None:
        n_head = released_heads(dim, n_layer, model_name)
    if n_head < 1 or "layers.0.feed_forward.w1.weight" not in state:
        raise CheckpointError(f"{source}: cannot tell the GPT's shape from this file (width {dim}, model "
                              f"{model_name!r}); give its number of attention heads (n_head=)")
    if image_tokens is None:
        size, downsample = getattr(args, "image_size", 256), getattr(args, "downsample_size", 16)
        image_tokens = (size // downsample) ** 2
    return {
        "type": "llamagen-gpt", "dim": dim, "n_head": n_head, "vocab_size": vocab_size, "n_layer": n_layer,
        "ffn_hidden": state["layers.0.feed_forward.w1.weight"].shape[0],
        "num_classes": state["cls_embedding.embedding_table.weight"].shape[0] - 1,
        "image_tokens": image_tokens,
    }


def released_heads(dim: int, n_layer: int, model_name: str | None) -> int:
    """The attention heads of a released GPT: its preset by the name in `args`, else the preset of this width and
    depth (files saved by FSDP carry no `args`; GPT-3B's heads are 100 wide), else heads of 64."""
    if model_name in GPT_PRESETS:
        return GPT_PRESETS[model_name]["n_head"]
    same_shape = [preset["n_head"] for preset in GPT_PRESETS.values()
                  if (preset["dim"], preset["n_layer"]) == (dim, n_layer)]
    return same_shape[0] if same_shape else dim // 64


def build_official_gpt(obj: Any, source: str, use_ema: bool = True, n_head: int | None = None,
                       image_tokens: int | None = None) -> tuple[GPT, dict[str, Any]]:
    """A GPT in eval mode with the weights of a loaded official file, and its arch section."""
    state = official_gpt_state(obj, use_ema)
    if state is None:
        raise CheckpointError(f"{source}: not an official LlamaGen / NPP GPT checkpoint (expected a 'model' state "
                              f"dict with {', '.join(GPT_SIGNATURE)})")
    arch = gpt_arch_from_state(state, source, obj.get("args"), n_head, image_tokens)
    model = GPT.from_config(arch, source)
    strict_load(model, state, source)
    return model.eval(), arch


def load_official_gpt(path: str, use_ema: bool = True, n_head: int | None = None,
                      image_tokens: int | None = None) -> tuple[GPT, dict[str, Any]]:
    """`build_official_gpt` of the file at `path`."""
    return build_official_gpt(load_file(path), path, use_ema, n_head, image_tokens)


def read_vq_config(path: str) -> Config:
    """A LlamaGen VQ tokenizer config (ours: `arch.type: vq16`), validated: a training config (with an
    `optimizer` section) as main_stage1.py would, else its dataset and arch."""
    data = read_yaml(path)
    if not isinstance(data.get("arch"), Mapping) or data["arch"].get("type") != "vq16":
        raise ConfigError(f"{path}: not a LlamaGen VQ config (arch.type must be vq16); e.g. "
                          "configs/imagenet/stage1/llamagen-vq16.yaml")
    return validate(data, STAGE1_SCHEMA if "optimizer" in data else VQ_CONFIG, path)


# ----------------------------------------------------------------------------------------------
# The hooks of the method record (npp/method.py)
# ----------------------------------------------------------------------------------------------

def official_tokenizer(obj: Any, path: str, config_path: str | None, use_ema: bool
                       ) -> tuple[VQTokenizer, Config] | None:
    """A released VQ file, rebuilt from its weight shapes (ImageNet at 256 px) or from `config_path`."""
    state = official_vq_state(obj, use_ema)
    if state is None:
        return None
    config = read_vq_config(config_path) if config_path else vq_config_from_state(state, path)
    model = VQTokenizer.from_config(config["arch"], path)
    strict_load(model, state, path)
    return model.eval(), config


def official_tokenizer_weights(obj: Any, path: str, model: Any, use_ema: bool
                               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None] | None:
    """A VQ training checkpoint of vq_train.py (`model`, `ema` with --ema, `discriminator`, `optimizer`,
    `optimizer_disc`, `steps`, `args`) or a released file, as a fine-tuning start: the tokenizer's weights
    and the discriminator's when present (the optimizers and step count are not carried over)."""
    state = official_vq_state(obj, use_ema)
    if state is None:
        return None
    if not isinstance(model, VQTokenizer):
        raise CheckpointError(f"{path}: a LlamaGen VQ tokenizer, and the config trains a {type(model).__name__}; "
                              "-l takes a checkpoint of the config's tokenizer")
    discriminator = obj.get("discriminator")
    return state, dict(discriminator) if isinstance(discriminator, Mapping) else None


def official_prior(obj: Any, path: str, tokenizer: Any, use_ema: bool, config_path: str | None
                   ) -> tuple[GPT, dict[str, Any], dict[str, Any]] | None:
    """A released GPT file; LlamaGen samples with the knobs' defaults (temperature 1, no top-k / top-p)."""
    if official_gpt_state(obj) is None:
        return None
    ema = use_ema and isinstance(obj.get("ema"), Mapping)
    grid = square_grid(tokenizer)
    # The official sampler builds the GPT and the VQ at one --image-size: a file without `args` (saved by FSDP)
    # gets the tokenizer's grid, and a grid that differs from the tokenizer's is refused below.
    image_tokens = grid[0] ** 2 if grid is not None and obj.get("args") is None else None
    prior, arch = build_official_gpt(obj, path, ema, image_tokens=image_tokens)
    check_released_size(prior, path, tokenizer, grid)
    return prior, {"arch": arch}, {"ema": ema}


RELEASED_NAME = re.compile(r"^c2i_\w+?_(\d+)\.pt$")  # LlamaGen's and NPP's: c2i_3B_384.pt, trained at 384 px


def check_released_size(prior: GPT, path: str, tokenizer: Any, grid: tuple[int, int] | None) -> None:
    """Refuse a GPT whose code grid (from its `args`, or the image size its released name states) is not the
    tokenizer's: its rotary positions would be another grid's."""
    if grid is None:
        return  # not a grid of codes at all: check_tokenizer says why
    named = RELEASED_NAME.match(os.path.basename(path))
    side = int(named.group(1)) // tokenizer.downsample_factor if named else prior.grid
    if side != prior.grid or side != grid[0]:
        size = side * tokenizer.downsample_factor
        raise CheckpointError(
            f"{path}: a GPT of {side}x{side} codes ({size} px) and the tokenizer (-v) makes {grid[0]}x{grid[1]} codes; "
            f"give the tokenizer at {size} px: --image-size {size} (LlamaGen's flag), or --config with "
            f"arch.image_size: {size}")


def official_prior_weights(obj: Any, path: str, model: GPT) -> dict[str, torch.Tensor] | None:
    return official_gpt_state(obj, use_ema=False)

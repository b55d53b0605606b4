"""Official LlamaGen VQ tokenizer files (e.g. `vq_ds16_c2i.pt`): recognising and loading their layout.

A released file is a dict whose `model` (and, from the VQ trainer with EMA, `ema`) holds the
`VQModel` state dict under the same names as ours, or that bare state dict. No config travels
with it: the widths, the number of levels and the codebook are read off the weight shapes, the
image size (not recoverable from a convolutional model) defaults to 256.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from common.config import Config, validate
from common.errors import CheckpointError
from npp.schema import VQ_CONFIG

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

"""Finding pretrained weight files offline (Inception for FID, VGG16 for LPIPS).

Nothing is downloaded: a file is taken from an explicit path or from torch's hub cache
(`$TORCH_HOME/hub/checkpoints`, by default `~/.cache/torch/hub/checkpoints`), and a missing
file is a WeightsError that names it, where to put it and where it is published.
"""
from __future__ import annotations

import os

import torch

from common.errors import WeightsError


def hub_checkpoint_dir() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def find_weights(filename: str, explicit_path: str | None, url: str, flag: str) -> str:
    """Return a readable path to `filename`: `explicit_path` if given, else the hub cache copy.

    `flag` is the command-line option or config key that sets `explicit_path`, named in the error.
    """
    if explicit_path:
        if os.path.isdir(explicit_path):
            raise WeightsError(f"weights file {explicit_path} (given by {flag}) is a folder; give the file {filename} "
                               "itself")
        if os.path.isfile(explicit_path):
            return explicit_path
        raise WeightsError(f"weights file {explicit_path} (given by {flag}) does not exist; "
                           f"it should be {filename}, published at {url}")
    cached = os.path.join(hub_checkpoint_dir(), filename)
    if os.path.isfile(cached):
        return cached
    raise WeightsError(f"pretrained weights {filename} not found: download {url} and either pass "
                       f"{flag} PATH or put it at {cached}")

"""Self-describing checkpoints: written atomically, read with `weights_only=True` only.

One file holds everything needed to rebuild the model (`config`) and to continue a run
exactly: model and EMA weights, optimizer and scheduler states, step / epoch / position in
the epoch, and the RNG states. Official checkpoints of the four methods have other layouts;
each method's `official` module recognises and converts them.
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
from typing import Any

import numpy as np
import torch

from common.errors import CheckpointError

FORMAT = "argen-checkpoint/1"


def save_checkpoint(path: str, payload: dict[str, Any]) -> None:
    """Write `payload` (plus the format tag) to `path` via a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        torch.save({"format": FORMAT, **payload}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_file(path: str, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with every failure turned into one clear CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        # argparse.Namespace: official training scripts (LlamaGen, NPP) store their arguments in it; plain data
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if "Weights only load failed" in str(error) or "Unsupported global" in str(error):
            raise CheckpointError(f"{path}: refused, the file contains Python objects or code, not only tensors "
                                  "(checkpoints are loaded as data only)") from None
        raise CheckpointError(f"{path}: not a checkpoint ({first_line})") from None
    except Exception as error:  # torch raises many kinds (OSError, KeyError, RuntimeError, ...) for damaged files
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({message})") from None


def is_our_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our own checkpoints; anything else is a CheckpointError."""
    obj = load_file(path, map_location)
    if not is_our_checkpoint(obj):
        raise CheckpointError(f"{path}: not a checkpoint of this codebase (no '{FORMAT}' tag); "
                              "official checkpoints are read by the method's loader (see README)")
    return obj


# ----------------------------------------------------------------------------------------------
# RNG states, stored as tensors and plain numbers so that weights_only loading accepts them
# ----------------------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def strict_load(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` whose failure lists the missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches (file vs model)", mismatched)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model built from its config; " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)

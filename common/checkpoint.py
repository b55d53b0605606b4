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
import re
import shutil
from typing import Any, Mapping

import numpy as np
import torch

from common.errors import CheckpointError, first_line
from common.fsdp import shard_state_dict
from common.paths import require_file

FORMAT = "argen-checkpoint/1"
DCP_METADATA = ".metadata"  # what marks a folder written by torch.distributed.checkpoint (experiment.dcp)
STALE_TEMPORARY = re.compile(r"\..+\.tmp(\d+)")  # save_checkpoint's `.<name>.tmp<pid>`
# What torch's data-only reader says when the pickle would import or call something: code, never loaded
CODE_REFUSALS = ("not an allowed global", "is blocked", "unrecognized function", "Can only create new object",
                 "Unsupported class")
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")  # torch.save: a zip archive, or (legacy format) a pickle


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


def remove_stale_temporaries(directory: str) -> list[str]:
    """Delete the temporary files save_checkpoint left in `directory` when its process was killed mid-write
    (`.<name>.tmp<pid>` of a process no longer running here, or of this process, which has written none yet);
    returns their names."""
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        match = STALE_TEMPORARY.fullmatch(name)
        if match and (int(match.group(1)) == os.getpid() or not process_running(int(match.group(1)))):
            path = os.path.join(directory, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)  # a folder: a sharded checkpoint's
            removed.append(name)
    return removed


def process_running(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def load_file(path: str, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` with every failure turned into one clear CheckpointError. `mmap`: the
    tensors stay in the file until used (processes of one host that all read it share its pages)."""
    if os.path.isfile(os.path.join(path, DCP_METADATA)):
        raise CheckpointError(f"{path}: a sharded checkpoint folder (torch.distributed.checkpoint, experiment.dcp), "
                              "not a checkpoint file; training resumes from it, and `python scripts/dcp_to_file.py "
                              f"{path} FILE.pt` makes the one file this needs")
    require_file(path, "checkpoint", CheckpointError)
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({error.strerror})") from None
    if not head.startswith(TORCH_FILE_STARTS):  # refused before unpickling, with a reason a user recognises
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file ({describe_foreign_bytes(head)})")
    try:
        # argparse.Namespace: official training scripts (LlamaGen, NPP) store their arguments in it; plain data
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if any(mark in str(error) for mark in CODE_REFUSALS):
            raise CheckpointError(f"{path}: refused, the file contains Python objects or code, not only tensors "
                                  "(checkpoints are loaded as data only)") from None
        if "Weights only load failed" in str(error):  # an opcode the data-only reader does not know: damaged bytes
            raise CheckpointError(f"{path}: not a checkpoint, or a damaged one (its pickled data cannot be read); "
                                  "download or write it again") from None
        raise CheckpointError(f"{path}: not a checkpoint ({first_line(error)})") from None
    except Exception as error:  # torch raises many kinds (OSError, KeyError, RuntimeError, ...) for damaged files
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({first_line(error)})") from None


def describe_foreign_bytes(head: bytes) -> str:
    """What the first bytes of a file that is not a PyTorch file look like, for an error message."""
    if not head:
        return "the file is empty"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"<":
        return "it is an HTML or XML page: a download that saved a web page instead of the file?"
    return "it is neither the zip archive nor the pickle that torch.save writes"


def is_our_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_checkpoint(path: str, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load one of our own checkpoints; anything else is a CheckpointError."""
    obj = load_file(path, map_location, mmap)
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


def _shape(value: Any) -> tuple | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def weight_mismatches(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> list[str]:
    """The missing, unexpected and mis-shaped keys of `given` against a module's state dict `expected`, as
    phrases for an error message (a value that is not a tensor counts as mis-shaped); empty when all fit."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [f"{k} {_shape(given[k])} vs {tuple(expected[k].shape)}"
                  for k in expected if k in given and _shape(given[k]) != tuple(expected[k].shape)]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches (file vs model)", mismatched)):
        if keys:
            shown = ", ".join(map(str, keys[:8])) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label}: {shown}")
    return problems


def strict_load(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` whose failure lists the missing, unexpected and mis-shaped keys; full
    weights load into an FSDP-sharded module too (each rank takes its shard)."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: holds a {type(state_dict).__name__} where the model's weights should be")
    problems = weight_mismatches(module.state_dict(), state_dict)
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model built from its config; " + "; ".join(problems))
    module.load_state_dict(shard_state_dict(module.state_dict(), state_dict), strict=True)

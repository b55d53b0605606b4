"""Sharded checkpoints through PyTorch's distributed checkpoint (`experiment.dcp: true`), for models whose full
state does not fit one host's memory.

A checkpoint is then a folder (`last.dcp/`, `epoch{N}_model.dcp/`) instead of a file: every rank writes the
shards it holds of the sharded tensors (DTensors: FSDP weights, their EMA and optimizer moments) with
`torch.distributed.checkpoint.save`, and rank 0 writes everything else as `meta.pt`, one of our checkpoint files
in which each sharded tensor's place holds SHARDED (without FSDP nothing is sharded: `meta.pt` holds it all).
Resuming reads into each rank only its own shards, with any number of processes (the distributed checkpoint
reshards); `join_folder` (scripts/dcp_to_file.py) makes one checkpoint file of a folder, for sampling. The folder
is written beside the old one and swapped in after, so a kill mid-write leaves the previous checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from typing import Any, Iterator, Mapping

import torch
from torch.distributed.tensor import DTensor

from common.checkpoint import DCP_METADATA, load_checkpoint, save_checkpoint
from common.dist import barrier, broadcast_object
from common.fsdp import map_leaves

SUFFIX = ".dcp"
META = "meta.pt"
SHARDED = "<sharded: in the distributed checkpoint>"


@contextlib.contextmanager
def one_process_quietly() -> Iterator[None]:
    """Without a process group torch warns that it reads or writes as one process: what a run of one process means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def folder_name(file_name: str) -> str:
    """The folder a checkpoint named like a file (`last.pt`) gets: `last.dcp`."""
    return os.path.splitext(file_name)[0] + SUFFIX


def is_dcp_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, DCP_METADATA)) and os.path.isfile(os.path.join(path, META))


def key(path: tuple) -> str:
    """The name a tensor at keys `path` of a checkpoint has in the distributed checkpoint: "model/wte.weight"."""
    return "/".join(map(str, path))


def split(state: Mapping[str, Any]) -> tuple[Any, dict[str, DTensor]]:
    """(`state` with each DTensor replaced by SHARDED, {the DTensor's key: the DTensor})."""
    tensors: dict[str, DTensor] = {}

    def take(value: Any, path: tuple) -> Any:
        if not isinstance(value, DTensor):
            return value
        tensors[key(path)] = value
        return SHARDED

    return map_leaves(state, take), tensors


def join(meta: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """`meta` with each SHARDED place filled from `tensors` (the inverse of `split`)."""
    return map_leaves(meta, lambda value, path: tensors[key(path)] if isinstance(value, str) and value == SHARDED
                      else value)


def save_sharded(folder: str, payload: Mapping[str, Any], is_main: bool) -> None:
    """Write a checkpoint payload as a folder (every rank calls this)."""
    import torch.distributed.checkpoint as dcp  # a second to import: only runs that write folders pay it

    meta, tensors = split(payload)
    parent, name = os.path.split(os.path.abspath(folder))
    stamp = broadcast_object(os.getpid())  # rank 0's: every rank writes into the same temporary folder
    temporary, previous = os.path.join(parent, f".{name}.tmp{stamp}"), os.path.join(parent, f".{name}.old.tmp{stamp}")
    with one_process_quietly():
        dcp.save(tensors, checkpoint_id=temporary)
    if is_main:
        save_checkpoint(os.path.join(temporary, META), meta)
        if os.path.isdir(folder):
            os.replace(folder, previous)
        os.replace(temporary, folder)
        shutil.rmtree(previous, ignore_errors=True)
    barrier()


def destination(path: str, meta: Mapping[str, Any], objects: Mapping[str, Any], stored: Any) -> torch.Tensor:
    """Where a stored tensor is read to: a shard like the run's own tensor at that place (a model or EMA entry,
    or the parameter an optimizer moment belongs to) when the run shards it, else a whole tensor."""
    parts = path.split("/")
    owner = objects.get(parts[0])
    reference = None
    if isinstance(owner, torch.optim.Optimizer) and parts[1] == "state":
        params = {str(index): param for saved, group in zip(meta[parts[0]]["param_groups"], owner.param_groups)
                  for index, param in zip(saved["params"], group["params"])}
        reference = params.get(parts[2])
    elif owner is not None and hasattr(owner, "state_dict"):
        reference = owner.state_dict()
        for part in parts[1:]:
            reference = reference.get(part) if isinstance(reference, dict) else None
    if isinstance(reference, DTensor) and tuple(reference.shape) == tuple(stored.size):
        return torch.zeros_like(reference)
    return torch.empty(stored.size, dtype=stored.properties.dtype)


def load_sharded(folder: str, objects: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One of our checkpoints (the layout of a whole one) from a folder; its sharded tensors are read as shards of
    the run's `objects` (`TrainTask.state_objects()`) where the run shards them, whole elsewhere."""
    import torch.distributed.checkpoint as dcp

    meta = load_checkpoint(os.path.join(folder, META))
    stored = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    tensors = {path: destination(path, meta, objects or {}, entry) for path, entry in stored.items()}
    with one_process_quietly():
        dcp.load(tensors, checkpoint_id=folder)
    return join(meta, tensors)


def join_folder(folder: str, output: str) -> None:
    """Write a checkpoint folder as one checkpoint file (one process, whole tensors)."""
    checkpoint = load_sharded(folder)
    checkpoint.pop("format", None)
    save_checkpoint(output, checkpoint)

"""Distributed set-up that works the same under `python script.py` and under `torchrun`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); without them the
script runs as one process and no process group is created. A worker group torchrun restarts after a crash
meets under a name of its own attempt (`restarted_group_store`). The backend is nccl on CUDA and
gloo on CPU, so one command runs on a laptop, in CI with two CPU processes and on a cluster.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from common.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:<local_rank> when CUDA is present, else cpu; "cuda" -> cuda:<local_rank>."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def setup(device: str = "auto") -> DistEnv:
    """Join the torchrun process group if launched by torchrun; return this process's place in it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                store=restarted_group_store(world_size))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def restarted_group_store(world_size: int) -> dist.Store | None:
    """For a worker group that torchrun restarted (`--max-restarts`): torchrun's own store under a name of this
    attempt. torchrun keeps one store for every attempt, so without it the new group would read the addresses the
    group that died left there and connect to processes that are gone. None for a first attempt (the default)."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False)
    return dist.PrefixStore(f"attempt{attempt}", store)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch with `seed + rank` (so ranks draw different noise); return it."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[DistEnv]:
    """`setup` for a script's work; after it, however it ends, every rank waits for the others and the group
    is closed."""
    env = setup(device)
    try:
        yield env
    finally:
        barrier()
        cleanup()


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Torch's CPU thread count set to `threads` (None: left as it is) inside, restored after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op in a single process); returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` along dim 0 over ranks in rank order; lengths may differ between ranks."""
    if not is_distributed():
        return tensor
    world = dist.get_world_size()
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    max_len = int(max(l.item() for l in lengths))
    padded = tensor.new_zeros((max_len, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(l.item())] for g, l in zip(gathered, lengths)], dim=0)


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from rank `src` to every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sync_gradients(module: torch.nn.Module) -> None:
    """Average a module's gradients over ranks, for a module that is not DDP-wrapped.

    The GAN discriminators are not: they run twice per step (real and fake in separate calls,
    so each gets its own BatchNorm statistics) and once in the generator step, whose gradients
    they must not keep.
    """
    if not is_distributed():
        return
    for p in module.parameters():
        if p.grad is not None:
            all_reduce_mean(p.grad)

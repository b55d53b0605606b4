"""FSDP2 for the large models, and activation checkpointing per block: PyTorch's own engines, switched by config.

`experiment.fsdp: true` under torchrun shards a model with `fully_shard` (FSDP2): each of the model's
`repeated_blocks()` (its transformer blocks) is one unit, gathered whole for its forward and backward and
freed after (`experiment.fsdp_reshard_after_forward`), and whatever else the training module holds is the root
unit. Parameters become DTensors holding this rank's shard, so the gradients, the optimizer state and the EMA
built from them are sharded the same way. On CUDA with `experiment.amp` the units compute in bf16 and reduce
gradients in fp32 (`MixedPrecisionPolicy`); on CPU everything stays fp32.

Checkpoints stay whole: `gather_full` turns every DTensor of a state into a full CPU tensor for rank 0 to save,
and `shard_like` / `shard_state_dict` / `shard_optimizer_state` cut full states back into this rank's shards on
loading, so one file serves FSDP, DDP, one process and sampling alike.

`experiment.grad_checkpointing` recomputes each block's activations in the backward pass instead of keeping them
(`torch.utils.checkpoint` around the block's forward, so the parameter names stay), with or without FSDP.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from common.dist import DistEnv


def fsdp_active(experiment: Mapping[str, Any], env: DistEnv) -> bool:
    """Whether a run shards its model: `experiment.fsdp` and more than one process (one process trains plainly)."""
    return bool(experiment.get("fsdp")) and env.distributed


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's `repeated_blocks()` (one unit of sharding and of recomputation each); none if it has no such
    method (the tokenizers: sharded as one unit)."""
    blocks = getattr(model, "repeated_blocks", None)
    return list(blocks()) if callable(blocks) else []


def recompute_blocks(model: nn.Module) -> int:
    """Make every repeated block of `model` recompute its activations in the backward pass; returns how many."""
    blocks = repeated_blocks(model)
    for block in blocks:
        block.forward = functools.partial(recomputed_forward, block, block.forward)
    return len(blocks)


def recomputed_forward(block: nn.Module, forward: Callable, *args: Any, **kwargs: Any) -> Any:
    """A block's `forward` under activation checkpointing when it trains with gradients; as it is otherwise
    (sampling with its caches, evaluation), where checkpointing would only cost time."""
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def shard(root: nn.Module, model: nn.Module, env: DistEnv, reshard_after_forward: bool, amp: bool,
          forward_methods: Sequence[str] = ()) -> None:
    """Shard the repeated blocks of `model`, then the rest of `root` (the module whose forward training calls:
    `model` or a module holding it), in place; `root`'s `forward_methods` gather the weights as its forward does.
    Every rank starts from rank 0's weights, as DDP does."""
    for tensor in root.state_dict().values():
        dist.broadcast(tensor, src=0)
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    bf16 = amp and env.device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)  # the root unit stays whole from forward to backward
    for method in forward_methods:
        register_fsdp_forward_method(root, method)


@contextlib.contextmanager
def gathered(root: nn.Module, reshard_after_forward: bool) -> Iterator[None]:
    """Inside the block a sharded `root` holds whole weights, gathered once and kept however many forward passes
    follow (evaluation, sampling); sharded again after. Nothing happens to a module that is not sharded."""
    if not isinstance(root, FSDPModule):
        yield
        return
    units = [unit for unit in root.modules() if isinstance(unit, FSDPModule)]
    root.set_reshard_after_forward(False)
    for unit in units:  # all now: sampling may read a block's weights without calling it (MAR's DiffLoss)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            if unit is not root:
                unit.set_reshard_after_forward(reshard_after_forward, recurse=False)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (every rank must ask: it is a collective); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def map_leaves(state: Any, change: Callable[[Any, tuple], Any], path: tuple = ()) -> Any:
    """`state` (nested dicts, lists and tuples) with each other value, found at keys `path`, replaced by
    change(value, path); in order, so that every rank walks a state alike."""
    if isinstance(state, dict):
        return {key: map_leaves(value, change, (*path, key)) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(map_leaves(value, change, (*path, i)) for i, value in enumerate(state))
    return change(state, path)


def gather_full(state: Any, keep: bool) -> Any:
    """`state` with every DTensor gathered into a full CPU tensor. Every rank must call it (each gather is a
    collective); ranks with `keep` false get None in those places."""
    def gather(value: Any, path: tuple) -> Any:
        if not isinstance(value, DTensor):
            return value
        full = value.full_tensor()
        return full.cpu() if keep else None

    return map_leaves(state, gather)


def shard_like(reference: torch.Tensor, full: Any) -> Any:
    """`full`, a whole tensor, cut into this rank's shard as the DTensor `reference` is (each rank slices its own
    part, nothing is sent); returned as it is when `reference` is not sharded."""
    if not isinstance(reference, DTensor) or not isinstance(full, torch.Tensor) or isinstance(full, DTensor):
        return full
    return distribute_tensor(full.to(reference.dtype), reference.device_mesh, reference.placements,
                             src_data_rank=None)


def shard_state_dict(reference: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> dict[str, Any]:
    """A full state dict cut like the module state dict `reference` (keys it lacks are kept for the key check)."""
    return {key: shard_like(reference[key], value) if key in reference else value for key, value in state.items()}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A full optimizer state (the `optimizer.state_dict()` layout) with each per-parameter tensor of its
    parameter's shape (Adam's moments) cut like that parameter; as it is when no parameter is sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        return state
    owner = {index: param for saved, group in zip(state["param_groups"], optimizer.param_groups)
             for index, param in zip(saved["params"], group["params"])}
    per_param = {}
    for index, values in state["state"].items():
        param = owner.get(index)
        per_param[index] = {key: shard_like(param, value) if param is not None and isinstance(value, torch.Tensor)
                            and value.shape == param.shape else value for key, value in values.items()}
    return {**state, "state": per_param}

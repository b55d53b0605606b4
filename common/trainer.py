"""The training loop every method shares: epochs of batches, logging, evaluation, checkpoints, resume.

A method supplies a `TrainTask`: its stateful objects (models, optimizers, schedulers, EMA,
...) by name, one training step, an evaluation over batches and a preview of images. The
loop owns everything else, so single-process, torchrun-DDP or FSDP, resume and logging behave
the same for every method. Checkpoints are whole files (an FSDP run's shards gathered by rank 0)
or, with `experiment.dcp`, sharded folders (common/dcp.py).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Mapping, Protocol

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from tqdm import tqdm

from common.checkpoint import capture_rng_state, restore_rng_state, save_checkpoint, strict_load
from common.config import Config, Field
from common.data import build_loader
from common.dcp import folder_name, save_sharded
from common.dist import DistEnv, all_reduce_mean, barrier, is_distributed
from common.errors import CheckpointError, DataError, first_line
from common.fault_injection import crash_once_at
from common.fsdp import fsdp_active, gather_full, shard_optimizer_state
from common.runlog import RunLog

EXPERIMENT_SCHEMA = {
    "batch_size": Field(int, doc="per-process batch", minimum=1),
    "epochs": Field(int, minimum=1),
    "save_ckpt_freq": Field(int, 1, doc="write epoch{N}_model.pt every N epochs", minimum=1),
    "test_freq": Field(int, 1, doc="evaluate every N epochs", minimum=1),
    "amp": Field(bool, False, doc="bf16 autocast on CUDA"),
    "total_batch_size": Field(int, None, minimum=1),
    "max_steps": Field(int, None, doc="stop (and checkpoint) after this many optimizer steps", minimum=1),
    "save_every_steps": Field(int, None, doc="also refresh last.pt every N steps (bounds the work a crash loses)",
                              minimum=1),
    "log_every": Field(int, 10, minimum=1),
    "num_workers": Field(int, 0, minimum=0),
    "eval_batches": Field(int, None, doc="limit evaluation to this many batches per process", minimum=1),
    "test_batch_size": Field(int, None, minimum=1),
    "preview_images": Field(int, 8, minimum=1),
    "tensorboard": Field(bool, True, doc="also write TensorBoard event files into the run directory"),
    "sample": Field(dict, None),
    "fsdp": Field(bool, False, doc="shard weights, gradients, optimizer state and EMA over the processes (FSDP2)"),
    "fsdp_reshard_after_forward": Field(bool, True, doc="FSDP: free each block's gathered weights after its "
                                                        "forward (less memory, one more all-gather in backward)"),
    "grad_checkpointing": Field(bool, False, doc="recompute each block's activations in the backward pass"),
    "dcp": Field(bool, False, doc="write checkpoints as sharded torch.distributed.checkpoint folders (*.dcp)"),
}


@dataclasses.dataclass
class Position:
    """Where a run stands: completed epochs, optimizer steps, and batches done in the current epoch."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0


class Averages:
    """Means of named scalars over evaluation batches: `add` each batch's values, then read `means`."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.count = 0

    def add(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        self.count += 1

    def means(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{key}": value / max(self.count, 1) for key, value in self.totals.items()}


class TrainTask(Protocol):
    def state_objects(self) -> dict[str, Any]:
        """Objects with state_dict()/load_state_dict() saved in checkpoints; must include "model"."""

    def train_step(self, batch: dict, position: Position) -> dict[str, float]:
        """One optimizer step on a batch; returns scalars to log."""

    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        """Averages of evaluation scalars over the given batches (this process's shard)."""

    def preview(self, batch: dict) -> torch.Tensor:
        """Images in [-1, 1] for a grid (e.g. inputs above reconstructions)."""


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches per process in one epoch: each rank takes floor(N / world) samples and drops the last partial
    batch. A set smaller than one global batch is a DataError."""
    steps = (num_samples // world_size) // batch_size
    if steps == 0:
        raise DataError(f"the training set has {num_samples} images, fewer than one global batch of "
                        f"{batch_size * world_size}; lower experiment.batch_size")
    return steps


def gather_rng_states() -> list[dict]:
    state = capture_rng_state()
    if not is_distributed():
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def checkpoint_payload(task: TrainTask, config: Config, position: Position) -> dict[str, Any]:
    """Everything a checkpoint holds; under FSDP its sharded tensors are DTensors (every rank calls this)."""
    payload = {name: obj.state_dict() for name, obj in task.state_objects().items()}
    payload.update(config=config.to_dict(), kind=config["arch"]["type"], position=dataclasses.asdict(position),
                   rng=gather_rng_states())
    return payload


def restore(task: TrainTask, checkpoint: Mapping[str, Any], env: DistEnv, source: str) -> Position:
    """Load every stateful object, the RNG state of this rank and the position from one of our checkpoints
    (read from `source`); state that does not fit the run is a CheckpointError naming the file."""
    for name, obj in task.state_objects().items():
        if name not in checkpoint:
            raise CheckpointError(f"{source}: holds no {name} state, which this run keeps; resume with the config "
                                  "the checkpoint was written with")
        if isinstance(obj, torch.nn.Module):
            strict_load(obj, checkpoint[name], source)
            continue
        try:
            state = checkpoint[name]
            obj.load_state_dict(shard_optimizer_state(obj, state) if isinstance(obj, torch.optim.Optimizer) else state)
        except CheckpointError as error:
            raise CheckpointError(f"{source}: {error}") from None
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{source}: its {name} state does not fit this run ({first_line(error)}); resume "
                                  "with the config the checkpoint was written with") from None
    rng_states = checkpoint["rng"]
    if len(rng_states) == env.world_size:
        restore_rng_state(rng_states[env.rank])
    return Position(**checkpoint["position"])


class Trainer:
    """Runs a TrainTask over a dataset for `experiment.epochs`, writing into `log.run_dir`."""

    def __init__(self, task: TrainTask, config: Config, env: DistEnv, log: RunLog, train_set: Dataset,
                 val_set: Dataset | None, batches_per_epoch: int, seed: int = 0):
        self.task, self.config, self.env, self.log = task, config, env, log
        self.experiment = config["experiment"]
        self.train_set, self.val_set = train_set, val_set
        self.seed = seed
        self.steps_per_epoch = batches_per_epoch
        self.skipped_images = 0
        self.sharded = fsdp_active(self.experiment, env)

    # ------------------------------------------------------------------------------------------
    def save(self, position: Position, name: str) -> None:
        """Write checkpoint `name` (`last.pt`, ...): one file, or with `experiment.dcp` a sharded folder."""
        payload = checkpoint_payload(self.task, self.config, position)  # every rank joins the RNG gather
        if self.experiment["dcp"]:
            save_sharded(self.log.path(folder_name(name)), payload, self.env.is_main)
            return
        payload = gather_full(payload, keep=self.env.is_main)  # FSDP shards gathered whole; nothing else changes
        if self.env.is_main:
            save_checkpoint(self.log.path(name), payload)
        barrier()

    def fit(self, position: Position | None = None) -> Position:
        """Train from `position` (a fresh run by default) to the end or to `experiment.max_steps`."""
        position = position or Position()
        if self.experiment["tensorboard"]:
            # Steps up to the checkpoint's were logged before it was saved; later ones an interrupted run logged
            # (or any run, for a fresh start) are logged anew and hidden in TensorBoard.
            self.log.open_tensorboard(purge_step=position.step + 1)
        try:
            return self.train_epochs(position)
        finally:
            self.log.close_tensorboard()

    def train_epochs(self, position: Position) -> Position:
        experiment = self.experiment
        batch_size = experiment["batch_size"]
        max_steps = experiment["max_steps"]
        while position.epoch < experiment["epochs"]:
            epoch = position.epoch
            loader = build_loader(self.train_set, batch_size, self.env.world_size, self.env.rank, shuffle=True,
                                  seed=self.seed, num_workers=experiment["num_workers"], epoch=epoch,
                                  start_index=position.batch_in_epoch * batch_size)
            bar = tqdm(loader, total=self.steps_per_epoch, initial=position.batch_in_epoch,
                       desc=f"epoch {epoch + 1}/{experiment['epochs']}", disable=not self.env.is_main,
                       dynamic_ncols=True, leave=False)
            for batch in bar:
                logs = self.task.train_step(batch, position)
                position.step += 1
                position.batch_in_epoch += 1
                self.skipped_images += int(batch["skipped"].sum())
                if position.step % experiment["log_every"] == 0 or position.step == 1:
                    record = self.reduce(logs)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in list(record.items())[:4]})
                    self.log.metrics({"split": "train", "step": position.step, "epoch": epoch, **record,
                                      "skipped_images": self.skipped_images})
                if experiment["save_every_steps"] and position.step % experiment["save_every_steps"] == 0:
                    self.save(position, "last.pt")
                crash_once_at(position.step, self.env.rank)
                if max_steps is not None and position.step >= max_steps:
                    bar.close()
                    self.save(position, "last.pt")
                    self.log.info(f"stopped at step {position.step} (experiment.max_steps); resume with --resume")
                    return position
            bar.close()
            position.epoch += 1
            position.batch_in_epoch = 0
            if self.skipped_images:
                self.log.info(f"{self.skipped_images} unreadable images skipped so far")
            if self.val_set is not None and position.epoch % experiment["test_freq"] == 0:
                self.evaluate_and_preview(position)
            if position.epoch % experiment["save_ckpt_freq"] == 0:
                self.save(position, f"epoch{position.epoch}_model.pt")
            self.save(position, "last.pt")
        return position

    # ------------------------------------------------------------------------------------------
    def reduce(self, logs: Mapping[str, float]) -> dict[str, float]:
        """Average logged scalars over ranks (same keys on every rank)."""
        if not logs:
            return {}
        values = torch.tensor([float(v) for v in logs.values()], dtype=torch.float64, device=self.env.device)
        all_reduce_mean(values)
        return dict(zip(logs.keys(), values.tolist()))

    def eval_batches(self, dataset: Dataset) -> Iterable[dict]:
        batch_size = self.experiment["test_batch_size"] or self.experiment["batch_size"]
        loader = build_loader(dataset, batch_size, self.env.world_size, self.env.rank, shuffle=False,
                              num_workers=self.experiment["num_workers"], drop_last=False)
        limit = self.experiment["eval_batches"]
        total = min(len(loader), limit) if limit else len(loader)
        for i, batch in enumerate(tqdm(loader, total=total, desc="eval", disable=not self.env.is_main, leave=False)):
            if limit is not None and i >= limit:
                break
            yield batch

    def evaluate_and_preview(self, position: Position) -> dict[str, float]:
        with torch.random.fork_rng(devices=[]):
            record = self.reduce(self.task.evaluate(self.eval_batches(self.val_set)))
            self.log.metrics({"split": "val", "step": position.step, "epoch": position.epoch, **record})
            self.log.info(f"epoch {position.epoch} step {position.step} val: "
                          + ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
            if self.env.is_main or self.sharded:  # a sharded model samples on every rank: its weights are spread
                count = min(self.experiment["preview_images"], len(self.val_set))
                batch = torch.utils.data.default_collate([self.val_set[i] for i in range(count)])
                self.log.image_grid(f"epoch{position.epoch:04d}", self.task.preview(batch), nrow=count,
                                    step=position.step)
        return record


def resolve_run_dir(result_path: str, config_path: str, postfix: str = "") -> str:
    """`<result-path>/<config stem>[__postfix]`, the official run-directory naming without the timestamp."""
    stem = os.path.splitext(os.path.basename(config_path))[0]
    return os.path.join(result_path, f"{stem}__{postfix}" if postfix else stem)

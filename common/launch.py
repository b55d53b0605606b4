"""What every training entry script does around its method: flags, config, processes, resume, eval.

`main_stage1.py`, `main_stage2.py` (and later `main_mar.py`) differ only in the schema, the task
and the datasets they build; the rest is here so the scripts stay a screen long.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable, Mapping

from torch.utils.data import Dataset

from common import dist
from common.checkpoint import load_checkpoint, remove_stale_temporaries
from common.config import Config, apply_overrides, parse_overrides, save_config, validate
from common.dcp import META, folder_name, is_dcp_folder, load_sharded
from common.errors import CheckpointError
from common.flags import at_least
from common.fsdp import fsdp_active
from common.paths import check_output_dir
from common.runlog import RunLog
from common.trainer import Position, TrainTask, Trainer, resolve_run_dir, restore, steps_per_epoch


def training_parser(description: str) -> argparse.ArgumentParser:
    """The official RQ-VAE training flags (-m -r -l -p --seed --eval --resume) plus --device."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model-config", required=True, help="YAML config")
    parser.add_argument("-r", "--result-path", required=True, help="runs go to <result-path>/<config stem>[__postfix]")
    parser.add_argument("-l", "--load-path", default="", help="checkpoint to start from (ours or official)")
    parser.add_argument("-p", "--postfix", default="", help="appended to the run directory name")
    parser.add_argument("-t", "--test-batch-size", type=at_least(1), default=None)
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    parser.add_argument("--resume", action="store_true", help="continue exactly from -l or <run dir>/last.pt")
    parser.add_argument("--fresh", action="store_true",
                        help="start afresh even if the run directory holds a last checkpoint (else the run resumes "
                             "from it by itself)")
    parser.add_argument("--eval", action="store_true", help="evaluate on train and val, no training")
    parser.add_argument("--device", default="auto", help="auto (cuda > cpu), cpu, cuda, cuda:N")
    # Accepted for compatibility with the official launch commands; torchrun's environment decides.
    for flag in ("--world_size", "--local_rank", "--local-rank", "--node_rank"):
        parser.add_argument(flag, type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dist-backend", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("-e", "--test-epoch", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def resolve_config(args: argparse.Namespace, extra: list[str], raw: Mapping[str, Any], schema: Mapping) -> Config:
    """Validate the YAML with the command line's dotted overrides (and --seed / -t) applied."""
    overrides = parse_overrides(extra)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.test_batch_size is not None:
        overrides["experiment.test_batch_size"] = args.test_batch_size
    return validate(apply_overrides(raw, overrides, schema, args.model_config), schema, args.model_config)


def check_kind(checkpoint: Mapping[str, Any], config: Config, path: str) -> None:
    """Refuse to resume from a checkpoint of another kind of model than the config trains."""
    kind, wanted = checkpoint.get("kind"), config["arch"]["type"]
    if kind != wanted:
        raise CheckpointError(f"{path}: a checkpoint of a {kind!r} model, and this run trains {wanted!r}; "
                              "resume from a checkpoint of this config's run")


def logged_before(record: Mapping[str, Any], position: Position) -> bool:
    """Whether a metrics record was written before the checkpoint at `position` was saved: training steps up to
    its step, and evaluations before it (at its step too when it closed an epoch: they run before the save)."""
    step = record.get("step")
    if not isinstance(step, int):
        return False
    if record.get("split") == "train":
        return step <= position.step
    return step < position.step or (step == position.step and position.batch_in_epoch == 0)


def latest_checkpoint(run_dir: str) -> str | None:
    """The run directory's last checkpoint: `last.pt`, or the sharded folder `last.dcp`, whichever is newer."""
    found = [path for path in (os.path.join(run_dir, "last.pt"), os.path.join(run_dir, folder_name("last.pt")))
             if os.path.isfile(path) or is_dcp_folder(path)]
    return max(found, key=lambda path: os.path.getmtime(path if os.path.isfile(path) else os.path.join(path, META)),
               default=None)


def resume_source(args: argparse.Namespace, run_dir: str) -> str | None:
    """The checkpoint a run continues: with --resume, -l or the run directory's last one (which must exist);
    without, the run directory's last one when there is one (a restarted run resumes by itself), unless the run
    evaluates or starts --fresh."""
    if args.resume:
        path = args.load_path or latest_checkpoint(run_dir) or os.path.join(run_dir, "last.pt")
        if not os.path.exists(path):
            raise CheckpointError(f"--resume: no checkpoint at {path}; give one with -l")
        return path
    if args.eval or getattr(args, "fresh", False):
        return None
    return latest_checkpoint(run_dir)


def read_checkpoint(path: str, task: TrainTask, env: dist.DistEnv, sharded: bool) -> dict[str, Any]:
    """A checkpoint to resume from: a sharded folder read shard by shard, or a file. A sharded run maps the file
    into memory on the CPU: the processes of a host share its pages, and each copies only its shards to its device."""
    if is_dcp_folder(path):
        return load_sharded(path, task.state_objects())
    return load_checkpoint(path, "cpu" if sharded else env.device, mmap=sharded)


def run_training(args: argparse.Namespace, config: Config, name: str,
                 build_datasets: Callable[[], tuple[Dataset, Dataset | None]],
                 build_task: Callable[[dist.DistEnv, int], TrainTask],
                 load_weights: Callable[[TrainTask, str], None]) -> None:
    """Set up the processes, then resume, fine-tune, evaluate or train as the flags say."""
    env = dist.setup(args.device)
    dist.seed_everything(config["seed"], env.rank)
    run_dir = resolve_run_dir(args.result_path, args.model_config, args.postfix)
    check_output_dir(run_dir, getattr(args, "output_flag", "-r/--result-path"))
    train_set, val_set = build_datasets()
    batches = steps_per_epoch(len(train_set), config["experiment"]["batch_size"], env.world_size)
    task = build_task(env, batches)

    position, started = Position(), None
    resume = resume_source(args, run_dir)
    if resume:
        try:
            checkpoint = read_checkpoint(resume, task, env, fsdp_active(config["experiment"], env))
            check_kind(checkpoint, config, resume)
            position = restore(task, checkpoint, env, resume)
        except CheckpointError as error:
            if args.resume:
                raise
            raise CheckpointError(f"{error} (the run directory's last checkpoint, resumed by itself: start afresh "
                                  "with --fresh, or choose another run directory)") from None
        del checkpoint  # a large model's optimizer state need not stay in memory twice
        started = f"resumed from {resume} at epoch {position.epoch}, step {position.step}"
        if not args.resume:
            started += " (the run directory's last checkpoint; --fresh starts afresh" + (
                f", and -l {args.load_path} is not loaded again)" if args.load_path else ")")
    elif args.load_path:
        load_weights(task, args.load_path)
        started = f"loaded weights from {args.load_path}"

    # Start-up is over: only now does the run write into its directory, so a refused start leaves nothing there.
    log = RunLog(run_dir, env.is_main)
    if env.is_main:
        for stale in remove_stale_temporaries(run_dir):
            log.info(f"removed {stale}, a checkpoint a killed run did not finish writing")
        if (resume or getattr(args, "fresh", False)) and not args.eval:  # afresh: position 0 keeps no record
            log.keep_metrics(lambda record: logged_before(record, position))
    trainer = Trainer(task, config, env, log, train_set, val_set, batches, seed=config["seed"])
    if started:
        log.info(started)
    if config["experiment"]["fsdp"] and not env.distributed:
        log.info("note: experiment.fsdp shards over several processes (torchrun); one process trains unsharded")

    if args.eval:
        results = {split: trainer.reduce(task.evaluate(trainer.eval_batches(dataset)))
                   for split, dataset in (("train", train_set), ("val", val_set)) if dataset is not None}
        if env.is_main:
            print(json.dumps(results, indent=2))
            with open(log.path("eval.json"), "w") as f:
                json.dump(results, f, indent=2)
    else:
        if env.is_main:
            save_config(config, log.path("config.yaml"))
        log.info(f"{name}: {sum(p.numel() for p in task.model.parameters()) / 1e6:.2f}M parameters, "
                 f"{len(train_set)} training items, {env.world_size} process(es) on {env.device}, run dir {run_dir}")
        trainer.fit(position)
        log.info(f"done: {run_dir}")
    dist.cleanup()

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
from common.checkpoint import load_checkpoint
from common.config import Config, apply_overrides, parse_overrides, save_config, validate
from common.errors import CheckpointError
from common.runlog import RunLog
from common.trainer import Position, TrainTask, Trainer, resolve_run_dir, restore, steps_per_epoch


def training_parser(description: str) -> argparse.ArgumentParser:
    """The official RQ-VAE training flags (-m -r -l -p --seed --eval --resume) plus --device."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model-config", required=True, help="YAML config")
    parser.add_argument("-r", "--result-path", required=True, help="runs go to <result-path>/<config stem>[__postfix]")
    parser.add_argument("-l", "--load-path", default="", help="checkpoint to start from (ours or official)")
    parser.add_argument("-p", "--postfix", default="", help="appended to the run directory name")
    parser.add_argument("-t", "--test-batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    parser.add_argument("--resume", action="store_true", help="continue exactly from -l or <run dir>/last.pt")
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


def run_training(args: argparse.Namespace, config: Config, name: str,
                 build_datasets: Callable[[], tuple[Dataset, Dataset | None]],
                 build_task: Callable[[dist.DistEnv, int], TrainTask],
                 load_weights: Callable[[TrainTask, str], None]) -> None:
    """Set up the processes, then resume, fine-tune, evaluate or train as the flags say."""
    env = dist.setup(args.device)
    dist.seed_everything(config["seed"], env.rank)
    run_dir = resolve_run_dir(args.result_path, args.model_config, args.postfix)
    log = RunLog(run_dir, env.is_main)
    train_set, val_set = build_datasets()
    batches = steps_per_epoch(len(train_set), config["experiment"]["batch_size"], env.world_size)
    task = build_task(env, batches)
    trainer = Trainer(task, config, env, log, train_set, val_set, batches, seed=config["seed"])

    position = Position()
    if args.resume:
        path = args.load_path or log.path("last.pt")
        if not os.path.isfile(path):
            raise CheckpointError(f"--resume: no checkpoint at {path}; give one with -l")
        position = restore(task, load_checkpoint(path, env.device), env)
        log.info(f"resumed from {path} at epoch {position.epoch}, step {position.step}")
    elif args.load_path:
        load_weights(task, args.load_path)
        log.info(f"loaded weights from {args.load_path}")

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

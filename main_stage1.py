"""Train (or evaluate) any stage-1 tokenizer from a YAML config.

    python main_stage1.py -m configs/shapes/stage1/rqvae.yaml -r results [key=value ...]
    torchrun --nproc_per_node=8 main_stage1.py -m configs/ffhq/stage1/ffhq256-rqvae-8x8x4.yaml -r results
    python main_stage1.py -m CONFIG -r results --resume            # continue results/<config stem>/last.pt
    python main_stage1.py -m CONFIG -r results -l official/model.pt  # fine-tune from a checkpoint
    python main_stage1.py -m CONFIG -r results -l CKPT --eval      # losses and codebook usage, no training
"""
from __future__ import annotations

import argparse
import json
import os

from common import dist
from common.checkpoint import load_checkpoint
from common.config import apply_overrides, parse_overrides, read_yaml, save_config, validate
from common.data import build_dataset_from_config
from common.errors import CheckpointError, cli_entry
from common.runlog import RunLog
from common.trainer import Position, Trainer, resolve_run_dir, restore, steps_per_epoch
from methods import stage1_method


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model-config", required=True, help="stage-1 YAML")
    parser.add_argument("-r", "--result-path", required=True, help="runs go to <result-path>/<config stem>[__postfix]")
    parser.add_argument("-l", "--load-path", default="", help="checkpoint to start from (ours or official)")
    parser.add_argument("-p", "--postfix", default="", help="appended to the run directory name")
    parser.add_argument("-t", "--test-batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    parser.add_argument("--resume", action="store_true", help="continue exactly from -l or <run dir>/last.pt")
    parser.add_argument("--eval", action="store_true", help="report losses and codebook usage, no training")
    parser.add_argument("--device", default="auto", help="auto (cuda > cpu), cpu, cuda, cuda:N")
    parser.add_argument("--vgg-weights", default=None, help="local vgg16-397923af.pth for LPIPS")
    # Accepted for command-line compatibility with the official launcher; torchrun's environment decides.
    for flag in ("--world_size", "--local_rank", "--local-rank", "--node_rank"):
        parser.add_argument(flag, type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dist-backend", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("-e", "--test-epoch", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def load_weights_into(task, path: str) -> None:
    """Fine-tuning start: model weights (and the discriminator when present) from ours or an official file."""
    from common.checkpoint import is_our_checkpoint, load_file, strict_load

    obj = load_file(path)
    if is_our_checkpoint(obj):
        strict_load(task.model, obj["model"], path)
        if "discriminator" in obj and hasattr(task, "discriminator"):
            strict_load(task.discriminator, obj["discriminator"], path)
        return
    from rqvae import official as rqvae_official

    if rqvae_official.is_official_rqvae_checkpoint(obj):
        strict_load(task.model, obj["state_dict"], path)
        if obj.get("discriminator") and hasattr(task, "discriminator"):
            strict_load(task.discriminator, obj["discriminator"], path)
        return
    raise CheckpointError(f"{path}: not a stage-1 checkpoint (ours or official RQ-VAE)")


@cli_entry
def main(argv=None) -> None:
    args, extra = parse_args(argv)
    overrides = parse_overrides(extra)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.test_batch_size is not None:
        overrides["experiment.test_batch_size"] = args.test_batch_size
    raw = read_yaml(args.model_config)
    method = stage1_method(raw, args.model_config)
    config = validate(apply_overrides(raw, overrides, method.schema, args.model_config), method.schema,
                      args.model_config)

    env = dist.setup(args.device)
    dist.seed_everything(config["seed"], env.rank)
    run_dir = resolve_run_dir(args.result_path, args.model_config, args.postfix)
    log = RunLog(run_dir, env.is_main)

    train_set = build_dataset_from_config(config["dataset"], "train")
    val_set = build_dataset_from_config(config["dataset"], "val")
    steps = steps_per_epoch(len(train_set), config["experiment"]["batch_size"], env.world_size)
    task = method.task(config, env, max(1, steps), args.vgg_weights)
    trainer = Trainer(task, config, env, log, train_set, val_set, seed=config["seed"])

    position = Position()
    if args.resume:
        path = args.load_path or log.path("last.pt")
        if not os.path.isfile(path):
            raise CheckpointError(f"--resume: no checkpoint at {path}; give one with -l")
        position = restore(task, load_checkpoint(path, env.device), env)
        log.info(f"resumed from {path} at epoch {position.epoch}, step {position.step}")
    elif args.load_path:
        load_weights_into(task, args.load_path)
        log.info(f"loaded weights from {args.load_path}")

    if args.eval:
        results = {}
        for split, dataset in (("train", train_set), ("val", val_set)):
            results[split] = trainer.reduce(task.evaluate(trainer.eval_batches(dataset)))
        if env.is_main:
            print(json.dumps(results, indent=2))
            with open(log.path("eval.json"), "w") as f:
                json.dump(results, f, indent=2)
        dist.cleanup()
        return

    if env.is_main:
        save_config(config, log.path("config.yaml"))
    log.info(f"{method.name}: {sum(p.numel() for p in task.model.parameters()) / 1e6:.2f}M parameters, "
             f"{len(train_set)} training images, {env.world_size} process(es) on {env.device}, run dir {run_dir}")
    trainer.fit(position)
    log.info(f"done: {run_dir}")
    dist.cleanup()


if __name__ == "__main__":
    main()

"""Train or evaluate MAR with the official command line (LTH14/mar `main_mar.py`), on the shared training loop.

    torchrun --nproc_per_node=8 --nnodes=4 ... main_mar.py --img_size 256 --vae_path pretrained_models/vae/kl16.ckpt \\
        --vae_embed_dim 16 --vae_stride 16 --patch_size 1 --model mar_large --diffloss_d 3 --diffloss_w 1024 \\
        --epochs 400 --warmup_epochs 100 --batch_size 64 --blr 1.0e-4 --diffusion_batch_mul 4 \\
        --output_dir OUT --resume OUT --data_path data/imagenet [--use_cached --cached_path CACHE]
    torchrun --nproc_per_node=8 main_mar.py --model mar_base --diffloss_d 6 --diffloss_w 1024 --eval_bsz 256 \\
        --num_images 50000 --num_iter 256 --num_sampling_steps 100 --cfg 2.9 --cfg_schedule linear \\
        --temperature 1.0 --output_dir pretrained_models/mar/mar_base --resume pretrained_models/mar/mar_base \\
        --evaluate --inception-weights weights-inception-2015-12-05-6726825d.pth
    python main_mar.py --config configs/imagenet/mar/mar-base.yaml --output_dir OUT experiment.batch_size=32

The flags mean what they mean officially and keep their defaults. With `--config`, the YAML is the
starting point instead of those defaults, and only the flags given change it; either way, dotted
`key=value` overrides come last. Runs go to --output_dir (our last.pt after every epoch, config.yaml,
train.log, metrics.jsonl). `--resume DIR` continues our last checkpoint in DIR (last.pt, or
the sharded last.dcp of an `experiment.dcp` run, whichever is newer), else the official
checkpoint-last.pth in DIR (weights, EMA and, when it has them, the optimizer state and epoch), else
training starts from scratch, as officially. A last.pt already in --output_dir comes first: a run restarted
with the same command (torchrun --max-restarts) continues by itself; --fresh starts afresh.

`--evaluate` generates --num_images images (the same number per class, --eval_bsz per process) with
the EMA weights of the checkpoint in --resume DIR, writes them as PNGs into
<output_dir>/ariter<num_iter>-diffsteps<steps>-temp<t>-<schedule>cfg<cfg>-image<n>_ema_evaluate/ with
samples.npz (ADM's layout) and metrics.json, and scores FID against `adm_in256` (adm_in256_stats.npz
under --stats-dir) and the Inception Score. Image b of batch g draws from a generator seeded by
(--seed, g), whatever the number of processes. Without the Inception weights or the reference the
images are still written and one line says what was not scored.

Not as officially: --online_eval logs the EMA loss on a few training batches and a grid of samples
every --eval_freq epochs (FID: --evaluate on a checkpoint); --save_last_freq is accepted, last.pt
being refreshed after every epoch; bf16 autocast on CUDA in training (officially fp16 with a loss
scaler, whose state is not carried over on resume).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image

from common import dist
from common.checkpoint import is_our_checkpoint, load_file, save_checkpoint, strict_load
from common.config import Config, apply_overrides, parse_overrides, read_yaml, validate
from common.data import build_dataset_from_config
from common.errors import CheckpointError, ConfigError, DataError, WeightsError, cli_entry
from common.knobs import resolve_knobs
from common.launch import latest_checkpoint, run_training
from common.metrics import (FIDStatistics, InceptionAccumulator, extract_features, find_inception_weights,
                            frechet_distance, inception_score, load_inception)
from common.metrics.fidelity import check_image_count, write_atomic
from common.metrics.images import NpzImages, NpzImageWriter
from common.metrics.inception import LOGITS, POOL
from common.metrics.reference import DEFAULT_STATS_DIR, resolve_reference
from common.sampler import Sampler, sample_in_shards
from common.trainer import steps_per_epoch
from common.weights import resolve_checkpoint_folder
from mar.cache import CachedLatents
from mar.model import MAR
from mar.official import official_mar_state
from mar.stage2 import MAR_SCHEMA, MARStage2Task, official_training_state, prepare, sampling_defaults
from methods import load_tokenizer

OURS, OFFICIAL = "last.pt", "checkpoint-last.pth"


@dataclass(frozen=True)
class Flag:
    kind: type
    default: Any  # the official default
    keys: tuple[str, ...]  # the config keys it sets
    doc: str = ""


# The official flags that are config values. The others (--evaluate, --resume, --output_dir, ...) steer the script.
FLAGS = {
    "model": Flag(str, "mar_large", ("arch.model",), "mar_base, mar_large or mar_huge"),
    "img_size": Flag(int, 256, ("arch.img_size", "dataset.resolution")),
    "vae_path": Flag(str, "pretrained_models/vae/kl16.ckpt", ("tokenizer.ckpt",), "kl16.ckpt or a kl-vae of ours"),
    "vae_embed_dim": Flag(int, 16, ("arch.vae_embed_dim",), "latent channels of the VAE"),
    "vae_stride": Flag(int, 16, ("arch.vae_stride",), "downsampling of the VAE"),
    "patch_size": Flag(int, 1, ("arch.patch_size",)),
    "class_num": Flag(int, 1000, ("arch.class_num",)),
    "label_drop_prob": Flag(float, 0.1, ("arch.label_drop_prob",)),
    "mask_ratio_min": Flag(float, 0.7, ("arch.mask_ratio_min",)),
    "attn_dropout": Flag(float, 0.1, ("arch.attn_dropout",)),
    "proj_dropout": Flag(float, 0.1, ("arch.proj_dropout",)),
    "buffer_size": Flag(int, 64, ("arch.buffer_size",)),
    "diffloss_d": Flag(int, 12, ("arch.diffloss_d",)),
    "diffloss_w": Flag(int, 1536, ("arch.diffloss_w",)),
    "num_sampling_steps": Flag(str, "100", ("arch.num_sampling_steps",), "diffusion steps per token when sampling"),
    "diffusion_batch_mul": Flag(int, 1, ("arch.diffusion_batch_mul",), "the released recipe uses 4"),
    "grad_checkpointing": Flag(bool, False, ("arch.grad_checkpointing",)),
    "num_iter": Flag(int, 64, ("experiment.sample.num_iter",), "autoregressive steps per image"),
    "cfg": Flag(float, 1.0, ("experiment.sample.cfg",), "classifier-free guidance scale"),
    "cfg_schedule": Flag(str, "linear", ("experiment.sample.cfg_schedule",), "linear or constant"),
    "temperature": Flag(float, 1.0, ("experiment.sample.temperature",)),
    "epochs": Flag(int, 400, ("experiment.epochs",)),
    "batch_size": Flag(int, 16, ("experiment.batch_size",), "per process"),
    "num_workers": Flag(int, 10, ("experiment.num_workers",)),
    "eval_freq": Flag(int, 40, ("experiment.test_freq",), "epochs between online evaluations"),
    "blr": Flag(float, 1e-4, ("mar.blr",), "lr = blr x global batch / 256"),
    "lr": Flag(float, None, ("mar.lr",), "absolute learning rate"),
    "min_lr": Flag(float, 0.0, ("mar.min_lr",)),
    "lr_schedule": Flag(str, "constant", ("mar.lr_schedule",), "constant or cosine"),
    "warmup_epochs": Flag(float, 100, ("mar.warmup_epochs",)),
    "ema_rate": Flag(float, 0.9999, ("mar.ema_rate",)),
    "grad_clip": Flag(float, 3.0, ("mar.grad_clip",)),
    "weight_decay": Flag(float, 0.02, ("optimizer.weight_decay",)),
    "seed": Flag(int, 1, ("seed",)),
    "data_path": Flag(str, "./data/imagenet", ("dataset.root",), "ImageNet: <data_path>/train/<class>/<images>"),
}
# What the flags do not say, for a run built from flags alone: ImageNet with ADM's centre crop, autocast,
# online evaluation on 10 batches, no epoch snapshots but the last.
BASE = {"dataset": {"type": "imagenet", "transforms": {"type": "center_crop"}}, "arch": {"type": "mar"},
        "experiment": {"amp": True, "eval_batches": 10}}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    for name, flag in FLAGS.items():  # None: not given (the official default applies without --config)
        default = "" if flag.default is None else f" (default {flag.default})"
        if flag.kind is bool:
            parser.add_argument(f"--{name}", action="store_true", default=None, help=flag.doc)
        else:
            parser.add_argument(f"--{name}", type=flag.kind, default=None, help=flag.doc + default)
    parser.add_argument("--config", default=None, help="a MAR config (configs/imagenet/mar/*.yaml) instead of the "
                                                       "official defaults")
    parser.add_argument("--use_cached", action="store_true", help="train on the latent cache of --cached_path")
    parser.add_argument("--cached_path", default=None, help="written by main_cache.py")
    parser.add_argument("--vae_config", default=None, help="a kl-vae config of ours for an official VAE file")
    parser.add_argument("--output_dir", default="./output_dir")
    parser.add_argument("--resume", default="", help=f"a folder with {OURS} (ours) or {OFFICIAL} (official)")
    parser.add_argument("--fresh", action="store_true", help=f"train afresh even if --output_dir holds a {OURS} "
                                                             "(else the run resumes from it by itself)")
    parser.add_argument("--evaluate", action="store_true", help="generate --num_images images and score them")
    parser.add_argument("--eval_bsz", type=int, default=64, help="images per process and batch")
    parser.add_argument("--num_images", type=int, default=50000)
    parser.add_argument("--online_eval", action="store_true", help="EMA loss and samples every --eval_freq epochs")
    parser.add_argument("--save_last_freq", type=int, default=5, help="accepted; last.pt is saved every epoch")
    parser.add_argument("--device", default="auto", help="auto (cuda > cpu), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="evaluation arithmetic; auto: fp16 autocast on CUDA (as officially), fp32 on CPU")
    parser.add_argument("--inception-weights", "--inception_weights", dest="inception_weights", default=None,
                        help="local weights-inception-2015-12-05-6726825d.pth (default: torch's hub cache)")
    parser.add_argument("--ref-stats", "--ref_stats", dest="ref_stats", default="adm_in256",
                        help="FID reference statistics: a .npz (mu, sigma) or a name under --stats-dir")
    parser.add_argument("--stats-dir", "--stats_dir", dest="stats_dir", default=DEFAULT_STATS_DIR)
    # official flags of no use here: the log goes to --output_dir, torchrun sets the processes
    for name in ("--log_dir", "--dist_url", "--start_epoch", "--world_size", "--local_rank", "--local-rank"):
        parser.add_argument(name, default=None, help=argparse.SUPPRESS)
    for name in ("--pin_mem", "--no_pin_mem", "--dist_on_itp"):
        parser.add_argument(name, action="store_true", help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def build_config(args: argparse.Namespace, extra: list[str]) -> tuple[Config, str]:
    """(config, its source for error lines): --config or the official defaults, then the given flags, then
    the key=value overrides."""
    given = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    if args.config:
        data, source, values = read_yaml(args.config), args.config, given
    else:
        data, source = BASE, "main_mar.py"
        values = {**{name: flag.default for name, flag in FLAGS.items()}, **given}
    overrides: dict[str, Any] = {key: value for name, value in values.items() for key in FLAGS[name].keys}
    if not args.config:
        overrides["experiment.save_ckpt_freq"] = values["epochs"]
    if args.use_cached:
        cached = args.cached_path or (data.get("cache") or {}).get("cached_path")
        if not cached:
            raise ConfigError("--use_cached needs --cached_path (the folder main_cache.py wrote)")
        overrides["cache.cached_path"] = cached
    unknown = [arg for arg in extra if arg.startswith("-")]
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a flag of main_mar.py (see --help); config values are set as key=value")
    overrides.update(parse_overrides(extra))
    return validate(apply_overrides(data, overrides, MAR_SCHEMA, source), MAR_SCHEMA, source), source


def check_args(args: argparse.Namespace, config: Config) -> None:
    """The mistakes that need no file: one line each, before anything is loaded."""
    schedule = (config["experiment"]["sample"] or {}).get("cfg_schedule", "linear")
    if schedule not in ("linear", "constant"):
        raise ConfigError(f"--cfg_schedule must be linear or constant, got {schedule!r}")
    if not args.evaluate:
        return
    if args.eval_bsz < 1 or args.num_images < 1:
        raise ConfigError(f"--eval_bsz and --num_images must be positive, got {args.eval_bsz} and {args.num_images}")
    classes = config["arch"]["class_num"]
    if args.num_images % classes:
        raise ConfigError(f"--num_images {args.num_images} must be a multiple of --class_num {classes}, so that every "
                          "class gets as many images")
    if not find_checkpoint(args.resume):
        where = f"--resume {args.resume} holds neither {OURS} nor {OFFICIAL}" if args.resume else "no --resume DIR"
        raise CheckpointError(f"--evaluate: {where}; nothing to evaluate (give the folder of a checkpoint)")


def find_checkpoint(folder: str) -> str | None:
    """Our last.pt in `folder`, else the official checkpoint-last.pth, else None."""
    for name in (OURS, OFFICIAL):
        path = os.path.join(folder, name)
        if folder and os.path.isfile(path):
            return path
    return None


def load_vae(args: argparse.Namespace, config: Config, source: str):
    """The tokenizer of tokenizer.ckpt, with the arch filled and checked against it."""
    tokenizer, _ = load_tokenizer(config["tokenizer"]["ckpt"], args.vae_config)
    return tokenizer, prepare(config, tokenizer, source)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def training_sets(args: argparse.Namespace, config: Config, tokenizer) -> tuple[Any, Any]:
    """(train set, val set): the latent cache or the images; with --online_eval the EMA loss is measured on
    the training set (the official runs have no validation split)."""
    cached = config["cache"]["cached_path"]
    if cached:
        train = CachedLatents(cached, config["seed"])
        train.check_tokenizer(tokenizer)
        side = config["arch"]["img_size"] // config["arch"]["vae_stride"]
        if tuple(train.moments_shape[1:]) != (side, side):
            raise DataError(f"{cached}: the cached moments are {list(train.moments_shape[1:])} latents, the model "
                            f"takes {side} x {side} (--img_size / --vae_stride); cache at this --img_size")
    else:
        train = build_dataset_from_config(config["dataset"], "train")
    return train, train if args.online_eval else None


def run_args(args: argparse.Namespace, resume_path: str | None, load_path: str = "") -> argparse.Namespace:
    """The flags run_training reads. It names a run <result_path>/<config stem>; the run here is --output_dir."""
    output = os.path.abspath(args.output_dir)
    return argparse.Namespace(device=args.device, result_path=os.path.dirname(output),
                              model_config=os.path.basename(output) + ".yaml", postfix="",
                              resume=resume_path is not None, load_path=resume_path or load_path, eval=False,
                              fresh=args.fresh, output_flag="--output_dir")


def train(args: argparse.Namespace, config: Config, source: str, env: dist.DistEnv) -> None:
    tokenizer, config = load_vae(args, config, source)
    train_set, val_set = training_sets(args, config, tokenizer)
    resume, load_weights = None, None
    own = None if args.fresh else latest_checkpoint(args.output_dir)
    given = latest_checkpoint(args.resume) if args.resume else None  # ours in --resume DIR: last.pt or last.dcp
    path = own or given or find_checkpoint(args.resume)  # a restarted run continues its own progress first
    if path and path in (own, given):
        resume = path
    elif path:
        obj = load_file(path)
        if "optimizer" in obj and "epoch" in obj:  # as officially: the whole state only with both
            batches = steps_per_epoch(len(train_set), config["experiment"]["batch_size"], env.world_size)
            state = official_training_state(obj, path, config, batches)  # checked on every rank: none waits alone
            resume = os.path.join(args.output_dir, OURS)
            if env.is_main:
                save_checkpoint(resume, state)
            dist.barrier()
        else:
            load_weights = official_weights_loader(obj)
        del obj
    elif args.resume and env.is_main:
        print(f"--resume {args.resume}: no {OURS} or {OFFICIAL} there; training from scratch")
    run_training(run_args(args, resume, path or ""), config, "mar", build_datasets=lambda: (train_set, val_set),
                 build_task=lambda env, steps: MARStage2Task(config, env, steps, tokenizer),
                 load_weights=load_weights or (lambda task, path: None))


def official_weights_loader(obj: dict) -> Callable[[MARStage2Task, str], None]:
    """Loads an official checkpoint without optimizer state: the weights, and the EMA (else the weights)."""
    def load(task: MARStage2Task, path: str) -> None:
        weights = official_mar_state(obj, use_ema=False)
        if weights is None:
            raise CheckpointError(f"{path}: not an official MAR checkpoint (no 'model' / 'model_ema' of a MAR)")
        strict_load(task.model, weights, path)
        task.ema.load_state_dict({"num_updates": 0, "shadow": official_mar_state(obj, use_ema=True)})
    return load


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def evaluation_weights(path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """(weights, whether they are the EMA ones) of our last.pt or an official checkpoint-last.pth."""
    obj = load_file(path)
    if is_our_checkpoint(obj):
        if obj.get("kind") != "mar":
            raise CheckpointError(f"{path}: holds a {obj.get('kind')!r} model, not MAR")
        return (obj["ema"]["shadow"], True) if obj.get("ema") else (obj["model"], False)
    weights = official_mar_state(obj, use_ema=True)
    if weights is None:
        raise CheckpointError(f"{path}: not an official MAR checkpoint (no 'model' / 'model_ema' of a MAR)")
    return weights, isinstance(obj.get("model_ema"), dict)


def scoring_tools(args: argparse.Namespace, notes: list[str]) -> tuple[str | None, Any]:
    """(Inception weights, FID reference), each None with a note when absent. A file named on the command line
    that is not there is an error; the default ones may be missing."""
    weights = reference = None
    try:
        weights = find_inception_weights(args.inception_weights)
    except WeightsError as error:
        if args.inception_weights:
            raise
        notes.append(f"not scored: {error}")
        return None, None
    try:
        reference = resolve_reference(args.ref_stats, args.stats_dir)
    except DataError as error:
        if args.ref_stats != "adm_in256":
            raise
        notes.append(f"no FID: {error}")
    if reference is not None and reference.stats is None:
        raise DataError(f"--ref-stats {args.ref_stats}: not a statistics file (mu, sigma)")
    check_image_count("isc", args.num_images, "--num_images")
    return weights, reference


def generate(sampler: Sampler, labels: torch.Tensor, batch_size: int, seed: int, size: int, env: dist.DistEnv,
             folder: str) -> str:
    """All ranks draw their batches; rank 0 writes <id:05d>.png and samples.npz. The last step is padded
    with class 0, and images past the last label are dropped, as officially. Returns the npz path."""
    npz = os.path.join(folder, "samples.npz")
    writer = NpzImageWriter(npz, labels.numpy(), size, size) if env.is_main else contextlib.nullcontext()
    with writer:
        for first, _, pixels in sample_in_shards(sampler, labels, batch_size, seed, env):
            if env.is_main:
                for offset, image in enumerate(pixels):
                    Image.fromarray(image).save(os.path.join(folder, f"{first + offset:05d}.png"))
                writer.add(pixels)
    dist.barrier()
    return npz


def evaluate(args: argparse.Namespace, config: Config, source: str, env: dist.DistEnv) -> dict[str, Any] | None:
    notes: list[str] = []
    inception, reference = scoring_tools(args, notes)
    tokenizer, config = load_vae(args, config, source)
    path = find_checkpoint(args.resume)
    weights, ema = evaluation_weights(path)
    prior = MAR.from_config(config["arch"], source)
    strict_load(prior, weights, path)
    knobs = resolve_knobs(MAR.SAMPLING_KNOBS, {}, sampling_defaults(config), prior_name="MAR")
    precision = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "auto": torch.float16 if env.device.type == "cuda" else None}[args.precision]
    sampler = Sampler(tokenizer.to(env.device).eval(), prior.to(env.device).eval(), knobs, ema, env.device, precision)
    classes = config["arch"]["class_num"]
    labels = torch.arange(classes).repeat_interleave(args.num_images // classes)
    name = f"{prior.knob_folder_name(knobs)}-image{args.num_images}" + ("_ema" if ema else "") + "_evaluate"
    folder = os.path.join(args.output_dir, name)
    if env.is_main:
        os.makedirs(folder, exist_ok=True)
        print(f"generating {args.num_images} images with {sampler.describe()}, {env.world_size} process(es) "
              f"-> {folder}")
    npz = generate(sampler, labels, args.eval_bsz, config["seed"], config["arch"]["img_size"], env, folder)

    features = None
    if inception is not None:  # every rank scores its share of the saved images
        accumulator = InceptionAccumulator(load_inception(inception, env.device))
        extract_features(NpzImages(npz), accumulator, env, args.eval_bsz, num_workers=0)
        features = accumulator.gather()
    if not env.is_main:
        return None
    results: dict[str, Any] = {}
    if features is not None:
        if reference is not None:
            results["fid"] = frechet_distance(FIDStatistics.from_features(features[POOL], folder), reference.stats)
            results["reference"] = reference.description
        results["is_mean"], results["is_std"] = inception_score(features[LOGITS])
    results.update(checkpoint=path, ema=ema, num_images=args.num_images, **knobs, eval_bsz=args.eval_bsz,
                   seed=config["seed"], world_size=env.world_size, folder=folder)
    write_atomic(os.path.join(folder, "metrics.json"),
                 lambda handle: handle.write((json.dumps(results, indent=2) + "\n").encode()))
    scores = ", ".join(f"{key} {results[key]:.4f}" for key in ("fid", "is_mean", "is_std") if key in results)
    print(f"{args.num_images} images in {folder}" + (f"; {scores}" if scores else ""))
    for note in notes:
        print(f"note: {note}")
    return results


@cli_entry
def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args, extra = parse_args(argv)
    args.resume = resolve_checkpoint_folder(args.resume)  # a release name (mar-base) stands for its folder
    config, source = build_config(args, extra)
    check_args(args, config)
    env = dist.setup(args.device)
    if not args.evaluate:
        return train(args, config, source, env)
    try:
        return evaluate(args, config, source, env)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main()

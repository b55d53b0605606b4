"""Sample N images from a stage-2 prior and score them: FID against reference statistics, Inception Score.

    python main_sampling_fid.py -v ffhq/stage1/model.pt -a ffhq/stage2/model.pt --ref-stats ffhq
    torchrun --nproc_per_node=8 main_sampling_fid.py -v in256/stage1/model.pt -a in256/stage2/model.pt \\
        -n 50000 -bs 125 --save-dir results --ref-stats assets/fid_stats/imagenet_256_train.npz
    python main_sampling_fid.py -v STAGE1 -a STAGE2 -n 64 -bs 16 --no-stats-saving      # images only

The official flags (-a -v -n -t --top-k --top-p -bs --ema --save-dir --seed) mean what they mean
there, except that EMA weights are used whenever the checkpoint has them (--no-ema: the raw ones) and
that --seed is reproducible: batch g (of -bs images, counted over all processes) draws from its own
generator seeded by (--seed, g), so the same seed and -bs give the same images whatever the number of
processes, and 0 is a seed like any other (officially it meant "random"). Class-conditional priors get
N / num_classes images of each class in contiguous blocks, as officially. Every sampling knob of the
prior is a flag or a key=value argument (`top_k=250`, `cfg_interval=10`); unset ones take the
checkpoint's defaults.

Results go to <save dir>/logs_fid/(valid|valid_ema)/<ckpt>_<knobs>/<timestamp>_<seed>/, the knobs named
as the prior names them (RQ-Transformer and GPT: temp_<t>_top_k_<k>_top_p_<p>[_cfg_<s>]), where <save dir> is the checkpoint's folder, or --save-dir/<grandparent>_<parent>:
samples/00000.png ..., samples.npz (arr_0 uint8 N x H x W x 3; labels, also as arr_1 like ADM's
samples), grid.png, stats.npz (mu, sigma of the Inception pool features) and metrics.json. Scores use
torch-fidelity's Inception (common.metrics) on the saved uint8 images.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from common import dist
from common.data import save_image_grid
from common.errors import ConfigError, DataError, cli_entry
from common.flags import at_least
from common.metrics import (FIDStatistics, InceptionAccumulator, find_inception_weights, frechet_distance,
                            inception_score, load_inception)
from common.metrics.fidelity import check_image_count, write_atomic
from common.metrics.images import NpzImageWriter
from common.metrics.inception import LOGITS, POOL
from common.metrics.reference import DEFAULT_STATS_DIR, resolve_reference
from common.paths import check_output_dir
from common.sampler import (Sampler, add_alias, add_official_sampling_flags, parse_sampling_args, result_dir,
                            sample_in_shards, sampling_parser)
from methods import load_sampler, sampling_knob_schemas

#################################################################################
#                                    Main                                       #
#################################################################################

def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = sampling_parser(__doc__, sampling_knob_schemas())
    parser.add_argument("-n", "--n-samples", type=at_least(1), default=50000, help="total number of images")
    parser.add_argument("--save-dir", default=None, help="results under SAVE_DIR/<grandparent>_<parent of -a>")
    add_alias(parser, "--num-fid-samples", "-n", "n_samples", at_least(1))
    add_alias(parser, "--sample-dir", "--save-dir", "save_dir", str)
    parser.add_argument("--inception-weights", default=None,
                        help="local weights-inception-2015-12-05-6726825d.pth (default: torch's hub cache)")
    parser.add_argument("--ref-stats", default=None,
                        help="FID reference: a statistics .npz (mu, sigma) or a name such as ffhq, imagenet "
                             "(looked up in --stats-dir); without it only the Inception Score is computed")
    parser.add_argument("--stats-dir", default=DEFAULT_STATS_DIR, help="where named reference statistics live")
    parser.add_argument("--no-stats-saving", action="store_false", dest="stats_saving",
                        help="only sample and save images: no Inception features, no scores")
    add_official_sampling_flags(parser)
    return parse_sampling_args(parser, argv)


def balanced_labels(n_samples: int, num_classes: int) -> torch.Tensor:
    """N labels in sorted contiguous blocks of N / num_classes (all zeros for an unconditional prior)."""
    if n_samples % num_classes:
        raise ConfigError(f"-n {n_samples} must be a multiple of the number of classes ({num_classes}) "
                          "so that every class gets as many images")
    return torch.arange(num_classes).repeat_interleave(n_samples // num_classes)


def images_from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> [-1, 1] float (N, 3, H, W)."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def in_sample_order(features: torch.Tensor, world_size: int, batch_size: int) -> torch.Tensor:
    """Gathered per-rank features (rank r's batches r, r + world, ... first) -> the order of the samples."""
    steps = features.shape[0] // (world_size * batch_size)
    return features.view(world_size, steps, batch_size, -1).transpose(0, 1).reshape(features.shape[0], -1)


def score(accumulator: InceptionAccumulator, reference, env: dist.DistEnv, batch_size: int, out_dir: str | None
          ) -> dict[str, Any]:
    """FID and Inception Score of every rank's images (collective; the results are rank 0's)."""
    features = accumulator.gather()
    if not env.is_main:
        return {}
    pool, logits = (in_sample_order(features[layer], env.world_size, batch_size) for layer in (POOL, LOGITS))
    stats = FIDStatistics.from_features(pool, "samples")
    stats.save(os.path.join(out_dir, "stats.npz"))
    results: dict[str, Any] = {}
    if reference is not None:
        results["fid"] = frechet_distance(stats, reference.stats)
        results["reference"] = reference.description
    results["is_mean"], results["is_std"] = inception_score(logits)
    return results


@cli_entry
def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Sample, save and score; on rank 0 print and return the metrics."""
    args, assignments = parse_args(argv)
    check_output_dir(args.save_dir or os.path.dirname(os.path.abspath(args.model_ar_path)),
                     "--save-dir" if args.save_dir else "the folder of -a (results go there without --save-dir)")
    env = dist.setup(args.device)
    try:
        return run(args, assignments, env)
    finally:
        dist.barrier()
        dist.cleanup()


def sample_and_save(args: argparse.Namespace, env: dist.DistEnv, sampler: Sampler, labels: torch.Tensor,
                    out_dir: str, accumulator: InceptionAccumulator | None) -> float:
    """Every rank samples its batches (and their Inception features); rank 0 gathers and writes the images.
    Returns the seconds it took."""
    size = sampler.image_size
    writer = (NpzImageWriter(os.path.join(out_dir, "samples.npz"), labels.numpy(), size, size) if env.is_main
              else contextlib.nullcontext())
    start = time.perf_counter()
    with writer:
        for first, images, pixels in sample_in_shards(sampler, labels, args.batch_size, args.seed, env):
            if accumulator is not None:
                accumulator.add(images)
            if not env.is_main:
                continue
            if first == 0:
                save_image_grid(images_from_uint8(pixels[:100]), os.path.join(out_dir, "grid.png"))
            for offset, image in enumerate(pixels):
                Image.fromarray(image).save(os.path.join(out_dir, "samples", f"{first + offset:05d}.png"))
            writer.add(pixels)
    return time.perf_counter() - start


def run(args: argparse.Namespace, assignments: list[str], env: dist.DistEnv) -> dict[str, Any] | None:
    """Check the request, sample, score; every rank runs this, rank 0 returns the results."""
    sampler = load_sampler(args, assignments, env.device)
    labels = balanced_labels(args.n_samples, sampler.prior.num_classes)
    per_step = args.batch_size * env.world_size
    if args.n_samples % per_step:
        raise ConfigError(f"-n {args.n_samples} must be a multiple of -bs x processes ({args.batch_size} x "
                          f"{env.world_size} = {per_step})")
    reference, accumulator = None, None
    if args.stats_saving:
        check_image_count("isc", args.n_samples, "-n")
        if args.ref_stats:
            reference = resolve_reference(args.ref_stats, args.stats_dir)
            if reference.stats is None:
                raise DataError(f"--ref-stats {args.ref_stats}: not a statistics file (mu, sigma); write one with "
                                "compute_metrics.py --fake FOLDER --save-stats OUT.npz")
        accumulator = InceptionAccumulator(load_inception(find_inception_weights(args.inception_weights), env.device))
    out_dir = dist.broadcast_object(result_dir(args, sampler) if env.is_main else None)
    if env.is_main:
        print(f"sampling {args.n_samples} images with {sampler.describe()}, {env.world_size} process(es) -> {out_dir}")

    seconds = sample_and_save(args, env, sampler, labels, out_dir, accumulator)
    results = score(accumulator, reference, env, args.batch_size, out_dir) if accumulator is not None else {}
    if not env.is_main:
        return None
    results.update(num_images=args.n_samples, seed=args.seed, stage1=args.model_vqvae_path,
                   stage2=args.model_ar_path, ema=sampler.use_ema, **sampler.knobs, image_size=sampler.image_size,
                   batch_size=args.batch_size, world_size=env.world_size, sampling_seconds=round(seconds, 3),
                   images_per_second=round(args.n_samples / seconds, 3), out_dir=out_dir)
    write_atomic(os.path.join(out_dir, "metrics.json"), lambda handle: handle.write(
        (json.dumps(results, indent=2) + "\n").encode()))
    scores = ", ".join(f"{key} {results[key]:.4f}" for key in ("fid", "is_mean", "is_std") if key in results)
    print(f"{args.n_samples} images in {seconds:.1f} s; {scores or 'not scored (--no-stats-saving)'}; "
          f"wrote {out_dir}")
    if args.stats_saving and reference is None:
        print("note: no FID without --ref-stats (a mu/sigma .npz or a name such as ffhq, imagenet)")
    return results


if __name__ == "__main__":
    main()

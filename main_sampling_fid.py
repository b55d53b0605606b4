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
N / num_classes images of each class in contiguous blocks, as officially.

Results go to <save dir>/logs_fid/(valid|valid_ema)/<ckpt>_temp_<t>_top_k_<k>_top_p_<p>[_cfg_<s>]/
<timestamp>_<seed>/, where <save dir> is the checkpoint's folder, or --save-dir/<grandparent>_<parent>:
samples/00000.png ..., samples.npz (arr_0 uint8 N x H x W x 3; labels, also as arr_1 like ADM's
samples), grid.png, stats.npz (mu, sigma of the Inception pool features) and metrics.json. Scores use
torch-fidelity's Inception (common.metrics) on the saved uint8 images.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common import dist
from common.data import derive_seed, save_image_grid, to_uint8
from common.errors import ConfigError, DataError, cli_entry
from common.metrics import (FIDStatistics, InceptionAccumulator, find_inception_weights, frechet_distance,
                            inception_score, load_inception)
from common.metrics.fidelity import check_image_count, write_atomic
from common.metrics.inception import LOGITS, POOL
from common.sampling import check_sampling_knobs, per_depth
from compute_metrics import DEFAULT_STATS_DIR, resolve_reference
from methods import load_prior, load_tokenizer

#################################################################################
#                 Loading and sampling (shared with scripts/sample.py)          #
#################################################################################


def sampling_parser(description: str) -> argparse.ArgumentParser:
    """The flags every sampling script takes: checkpoints, sampling knobs, seed, weights, device."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--model-vqvae-path", required=True, help="stage-1 checkpoint (ours or official .pt)")
    parser.add_argument("-a", "--model-ar-path", required=True, help="stage-2 checkpoint (ours or official .pt)")
    parser.add_argument("-t", "--temp", type=float, default=None, help="temperature (default: the checkpoint's)")
    parser.add_argument("--top-k", type=int, nargs="+", default=None,
                        help="top-k, one value or one per depth (default: the checkpoint's)")
    parser.add_argument("--top-p", type=float, nargs="+", default=None,
                        help="top-p, one value or one per depth (default: the checkpoint's)")
    parser.add_argument("--cfg", type=float, default=1.0,
                        help="classifier-free guidance scale (priors trained with a null class; 1 = off)")
    parser.add_argument("-bs", "--batch-size", type=int, default=100, help="images per batch per process")
    parser.add_argument("--seed", type=int, default=0, help="batch g draws from a generator seeded by (seed, g)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA")
    parser.add_argument("--ema", action="store_true", help="accepted for compatibility: EMA is the default")
    parser.add_argument("--device", default="auto", help="auto (cuda > cpu), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="the prior's arithmetic: auto = bf16 autocast on CUDA, fp32 on CPU")
    return parser


@dataclass
class Sampler:
    """A tokenizer and a prior on one device with resolved sampling knobs: labels in, codes and images out."""

    tokenizer: torch.nn.Module
    prior: torch.nn.Module
    knobs: dict[str, Any]  # temperature, top_k, top_p (one value per depth), cfg_scale
    use_ema: bool
    device: torch.device
    autocast_dtype: torch.dtype | None

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, seed: int, batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (B, h, w, D) and images (B, 3, H, W) in [-1, 1] for class labels (B,); batch `batch_index`
        draws from its own generator, so a batch's images do not depend on which process samples it."""
        generator = torch.Generator(self.device).manual_seed(derive_seed(seed, batch_index))
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            codes = self.prior.generate(labels.to(self.device), generator=generator, **self.knobs)
        return codes, self.tokenizer.decode_codes(codes).float().clamp(-1, 1)

    def describe(self) -> str:
        k = self.knobs
        return (f"temperature {k['temperature']}, top-k {k['top_k']}, top-p {k['top_p']}, cfg {k['cfg_scale']}, "
                f"{'EMA' if self.use_ema else 'raw'} weights, {self.autocast_dtype or torch.float32} on {self.device}")


def load_sampler(args: argparse.Namespace, device: torch.device) -> Sampler:
    """Tokenizer and prior from -v / -a, knobs from the flags or else the checkpoint's defaults."""
    check_sampling_knobs(1.0 if args.temp is None else args.temp, args.top_k, args.top_p)
    if args.batch_size < 1:
        raise ConfigError(f"-bs/--batch-size must be at least 1, got {args.batch_size}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    tokenizer, _ = load_tokenizer(args.model_vqvae_path)
    prior, _, defaults = load_prior(args.model_ar_path, tokenizer, use_ema=not args.no_ema)
    if args.cfg != 1.0 and prior.null_class is None:
        raise ConfigError(f"--cfg {args.cfg}: {args.model_ar_path} was not trained for classifier-free guidance "
                          "(arch.cfg_null_class); use --cfg 1")
    depth = prior.code_depth
    knobs = {"temperature": defaults["temperature"] if args.temp is None else args.temp,
             "top_k": per_depth(defaults["top_k"] if args.top_k is None else args.top_k, depth, "--top-k"),
             "top_p": per_depth(defaults["top_p"] if args.top_p is None else args.top_p, depth, "--top-p"),
             "cfg_scale": args.cfg}
    check_sampling_knobs(knobs["temperature"], knobs["top_k"], knobs["top_p"])
    use_ema = defaults["ema"]  # whether EMA weights were loaded
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    return Sampler(tokenizer.to(device), prior.to(device), knobs, use_ema, device, torch.bfloat16 if bf16 else None)


#################################################################################
#                                ADM .npz output                                #
#################################################################################

class NpzImageWriter:
    """Writes an ADM-style `.npz` batch by batch: arr_0 uint8 (N, H, W, 3) of N = len(labels) images, then
    the labels.

    Stored uncompressed, so readers can memory-map arr_0. Used as a context manager: the file appears
    (renamed) only when the block completes, and a failed block leaves nothing behind.
    """

    def __init__(self, path: str, labels: np.ndarray, height: int, width: int):
        self.path, self.tmp = path, f"{path}.tmp{os.getpid()}"
        self.labels = labels.astype(np.int64)
        self.shape, self.written = (len(labels), height, width, 3), 0

    def __enter__(self) -> NpzImageWriter:
        self.archive = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.stream = self.archive.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.stream, header)
        return self

    def add(self, images: np.ndarray) -> None:
        self.stream.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
        self.written += images.shape[0]

    def __exit__(self, error_type, error, traceback) -> None:
        self.stream.close()
        if error_type is None and self.written != self.shape[0]:
            raise RuntimeError(f"{self.path}: {self.written} images written, {self.shape[0]} announced")
        if error_type is None:
            buffer = io.BytesIO()
            np.save(buffer, self.labels)
            for name in ("labels.npy", "arr_1.npy"):
                self.archive.writestr(name, buffer.getvalue())
        self.archive.close()
        if error_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.remove(self.tmp)


#################################################################################
#                                    Main                                       #
#################################################################################

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = sampling_parser(__doc__)
    parser.add_argument("-n", "--n-samples", type=int, default=50000, help="total number of images")
    parser.add_argument("--save-dir", default=None, help="results under SAVE_DIR/<grandparent>_<parent of -a>")
    parser.add_argument("--inception-weights", default=None,
                        help="local weights-inception-2015-12-05-6726825d.pth (default: torch's hub cache)")
    parser.add_argument("--ref-stats", default=None,
                        help="FID reference: a statistics .npz (mu, sigma) or a name such as ffhq, imagenet "
                             "(looked up in --stats-dir); without it only the Inception Score is computed")
    parser.add_argument("--stats-dir", default=DEFAULT_STATS_DIR, help="where named reference statistics live")
    parser.add_argument("--no-stats-saving", action="store_false", dest="stats_saving",
                        help="only sample and save images: no Inception features, no scores")
    parser.add_argument("--no-tensorboard", action="store_true", help="accepted for compatibility (no tensorboard)")
    for flag in ("--world_size", "--local_rank", "--local-rank"):  # official launch flags; torchrun decides
        parser.add_argument(flag, type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dist-backend", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def balanced_labels(n_samples: int, num_classes: int) -> torch.Tensor:
    """N labels in sorted contiguous blocks of N / num_classes (all zeros for an unconditional prior)."""
    if n_samples % num_classes:
        raise ConfigError(f"-n {n_samples} must be a multiple of the number of classes ({num_classes}) "
                          "so that every class gets as many images")
    return torch.arange(num_classes).repeat_interleave(n_samples // num_classes)


def result_dir(args: argparse.Namespace, sampler: Sampler) -> str:
    """The official layout: <save dir>/logs_fid/(valid|valid_ema)/<ckpt>_temp_..._top_p_.../<timestamp>_<seed>."""
    ckpt = os.path.abspath(args.model_ar_path)
    parent = os.path.dirname(ckpt)
    root = (os.path.join(args.save_dir, f"{os.path.basename(os.path.dirname(parent))}_{os.path.basename(parent)}")
            if args.save_dir else parent)
    knobs = sampler.knobs
    name = (f"{os.path.basename(ckpt).split('.')[0]}_temp_{knobs['temperature']:.1f}"
            f"_top_k_{knob_name(knobs['top_k'])}_top_p_{knob_name(knobs['top_p'])}"
            + (f"_cfg_{knobs['cfg_scale']}" if knobs["cfg_scale"] != 1.0 else ""))
    stamp = f"{datetime.now().strftime('%d%m%Y_%H%M%S')}_{args.seed}"
    path = os.path.join(root, "logs_fid", "valid_ema" if sampler.use_ema else "valid", name, stamp)
    os.makedirs(os.path.join(path, "samples"))
    return path


def images_from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> [-1, 1] float (N, 3, H, W)."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def knob_name(values: list) -> str:
    """One value per depth as a folder-name part: the value if all agree, else all of them joined by '_'."""
    return str(values[0]) if len(set(values)) == 1 else "_".join(map(str, values))


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
    args = parse_args(argv)
    env = dist.setup(args.device)
    try:
        return run(args, env)
    finally:
        dist.barrier()
        dist.cleanup()


def sample_and_save(args: argparse.Namespace, env: dist.DistEnv, sampler: Sampler, labels: torch.Tensor,
                    out_dir: str, accumulator: InceptionAccumulator | None) -> float:
    """Every rank samples its batches (and their Inception features); rank 0 gathers and writes the images.
    Returns the seconds it took."""
    per_step = args.batch_size * env.world_size
    size = sampler.tokenizer.image_size
    writer = (NpzImageWriter(os.path.join(out_dir, "samples.npz"), labels.numpy(), size, size) if env.is_main
              else contextlib.nullcontext())
    start = time.perf_counter()
    with writer:
        for step in tqdm(range(args.n_samples // per_step), desc="sampling", unit="batch", disable=not env.is_main):
            batch_index = step * env.world_size + env.rank
            batch_labels = labels[batch_index * args.batch_size:(batch_index + 1) * args.batch_size]
            _, images = sampler.generate(batch_labels, args.seed, batch_index)
            if accumulator is not None:
                accumulator.add(images)
            pixels = dist.all_gather_cat(to_uint8(images).to(env.device)).cpu().numpy()  # (world * bs, H, W, 3)
            if not env.is_main:
                continue
            if step == 0:
                save_image_grid(images_from_uint8(pixels[:100]), os.path.join(out_dir, "grid.png"))
            for offset, image in enumerate(pixels):
                Image.fromarray(image).save(os.path.join(out_dir, "samples", f"{step * per_step + offset:05d}.png"))
            writer.add(pixels)
    return time.perf_counter() - start


def run(args: argparse.Namespace, env: dist.DistEnv) -> dict[str, Any] | None:
    """Check the request, sample, score; every rank runs this, rank 0 returns the results."""
    sampler = load_sampler(args, env.device)
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
                   stage2=args.model_ar_path, ema=sampler.use_ema, **sampler.knobs, batch_size=args.batch_size,
                   world_size=env.world_size, sampling_seconds=round(seconds, 3),
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

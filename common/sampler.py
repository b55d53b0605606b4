"""Drawing images from a prior and its tokenizer: the flags every sampling script takes, and the Sampler.

The knobs are the prior's own (its `SAMPLING_KNOBS`, see common/knobs.py), resolved from the
command line, then the checkpoint's defaults. Conditioning is by class label (B,) (an
unconditional prior takes zeros) or, for a text prior, by text token ids (B, L). Batch g of a run
draws from its own generator seeded by (seed, g), so a batch's images do not depend on which
process draws it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import dist
from common.data import derive_seed, to_uint8
from common.errors import ConfigError
from common.knobs import Knob, add_knob_flags, given_knobs, resolve_knobs, split_assignments
from common.tokenizer import Tokenizer
from common.weights import resolve_checkpoint


def sampling_parser(description: str, knob_schemas: Iterable[Mapping[str, Knob]]) -> argparse.ArgumentParser:
    """Checkpoints, every prior's knobs as flags, batch size, seed, weights, device and precision."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--model-vqvae-path", "--tokenizer", "--vq-ckpt", required=True,
                        help="stage-1 tokenizer checkpoint (ours or official)")
    parser.add_argument("--config", default=None,
                        help="the YAML an official Open-MAGVIT2 .ckpt given with -v was trained with")
    parser.add_argument("-a", "--model-ar-path", "--prior", "--gpt-ckpt", required=True,
                        help="stage-2 prior checkpoint (ours or official)")
    add_knob_flags(parser, knob_schemas)
    parser.add_argument("-bs", "--batch-size", type=int, default=100, help="images per batch per process")
    parser.add_argument("--seed", type=int, default=0, help="batch g draws from a generator seeded by (seed, g)")
    add_alias(parser, "--per-proc-batch-size", "-bs", "batch_size", int)
    add_alias(parser, "--global-seed", "--seed", "seed", int)
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA")
    parser.add_argument("--ema", action="store_true", help="accepted for compatibility: EMA is the default")
    parser.add_argument("--device", default="auto", help="auto (cuda > cpu), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="the prior's arithmetic: auto = bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="LlamaGen's flag: the tokenizer works at N px (its codes follow the image size; 384 for "
                             "LlamaGen's *_384 GPTs); default: its own")
    parser.add_argument("--image-size-eval", type=int, default=None, metavar="N",
                        help="LlamaGen's flag: resize the decoded images to N x N (bicubic) before they are saved and "
                             "scored (its 384 px models are evaluated at 256)")
    parser.add_argument("--text-tokenizer", default=None, metavar="DIR",
                        help="text priors of official releases: the folder holding the released vocabulary files "
                             "(bpe-16k-vocab.json, bpe-16k-merges.txt; default: torch's hub cache)")
    parser.epilog = ("Any sampling knob can also be given as key=value (e.g. top_k=250, num_iter=64); "
                     "unset knobs take the checkpoint's defaults.")
    return parser


def add_alias(parser: argparse.ArgumentParser, alias: str, flag: str, dest: str, kind: Callable) -> None:
    """`alias` (an official script's name of `flag`) sets what `flag` sets; errors about `flag` keep its name."""
    parser.add_argument(alias, dest=dest, type=kind, default=argparse.SUPPRESS, help=f"LlamaGen's name of {flag}")


def add_official_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the official sampling scripts that change nothing here: --no-tensorboard, and the launch flags
    (torchrun's environment decides)."""
    parser.add_argument("--no-tensorboard", action="store_true", help="accepted for compatibility (no tensorboard)")
    for flag in ("--world_size", "--local_rank", "--local-rank"):
        parser.add_argument(flag, type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dist-backend", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=None, help=argparse.SUPPRESS)


def parse_sampling_args(parser: argparse.ArgumentParser, argv: list[str] | None
                        ) -> tuple[argparse.Namespace, list[str]]:
    """(flags, knob assignments `name=value`) of a sampling command line; a release name given to -v or -a becomes
    its downloaded file (results are named after it and, without --save-dir, written beside it)."""
    rest, assignments = split_assignments(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    args.model_vqvae_path, args.config = resolve_checkpoint(args.model_vqvae_path, args.config)
    args.model_ar_path = resolve_checkpoint(args.model_ar_path).path
    return args, assignments


@dataclass
class Sampler:
    """A tokenizer and a prior on one device with resolved sampling knobs: labels in, tokens and images out."""

    tokenizer: Tokenizer
    prior: torch.nn.Module
    knobs: dict[str, Any]
    use_ema: bool
    device: torch.device
    autocast_dtype: torch.dtype | None
    eval_size: int | None = None  # images resized to this side after decoding (LlamaGen's --image-size-eval)

    @property
    def image_size(self) -> int:
        """The side of the images `generate` returns."""
        return self.eval_size or self.tokenizer.image_size

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, seed: int, batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, *token_shape) and images (B, 3, H, W) in [-1, 1] for class labels (B,) or the text token ids
        (B, L) of a text prior."""
        generator = torch.Generator(self.device).manual_seed(derive_seed(seed, batch_index))
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            tokens = self.prior.generate(labels.to(self.device), generator=generator, **self.knobs)
        images = self.tokenizer.decode_tokens(tokens.float() if tokens.is_floating_point() else tokens).float()
        if self.eval_size and images.shape[-1] != self.eval_size:  # as LlamaGen: the decoded values, then clamped
            images = F.interpolate(images, size=(self.eval_size, self.eval_size), mode="bicubic")
        return tokens, images.clamp(-1, 1)

    def folder_name(self) -> str:
        """The knobs as a result-folder name, in the prior's own convention."""
        return self.prior.knob_folder_name(self.knobs)

    def describe(self) -> str:
        knobs = ", ".join(f"{name.replace('_', '-')} {value}" for name, value in self.knobs.items())
        return (f"{knobs}, {'EMA' if self.use_ema else 'raw'} weights, {self.autocast_dtype or torch.float32} "
                f"on {self.device}")


def build_sampler(args: argparse.Namespace, assignments: Iterable[str], device: torch.device, tokenizer: Tokenizer,
                  prior: torch.nn.Module, defaults: Mapping[str, Any], source: str) -> Sampler:
    """A Sampler with the knobs of the command line (flags and name=value), else the checkpoint's defaults."""
    if args.batch_size < 1:
        raise ConfigError(f"-bs/--batch-size must be at least 1, got {args.batch_size}")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    if args.image_size_eval is not None and args.image_size_eval < 1:
        raise ConfigError(f"--image-size-eval must be a positive image side, got {args.image_size_eval}")
    knobs = resolve_knobs(prior.SAMPLING_KNOBS, given_knobs(args, assignments), defaults,
                          getattr(prior, "code_depth", 1), f"{source} ({type(prior).__name__})")
    guidance = next((name for name in ("cfg_scale", "cfg") if name in knobs), None)
    if guidance and knobs[guidance] != 1.0 and getattr(prior, "null_class", 0) is None:
        raise ConfigError(f"--cfg {knobs[guidance]}: {source} was not trained for classifier-free guidance "
                          "(arch.cfg_null_class); use --cfg 1")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    return Sampler(tokenizer.to(device), prior.to(device), knobs, bool(defaults.get("ema")), device,
                   torch.bfloat16 if bf16 else None, args.image_size_eval)


def sample_in_shards(sampler: Sampler, labels: torch.Tensor, batch_size: int, seed: int, env: dist.DistEnv
                     ) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
    """Every rank draws its batches of `labels` (batch g = step * world + rank, from its own generator) and
    the uint8 images of the step are gathered. Yields (index of the step's first image, this rank's images
    (B, 3, H, W), the step's pixels (n, H, W, 3) in image order). `labels` may be any conditions (N, ...), such as
    text token ids (N, L). The last step is padded with zeros (class 0, the empty caption) and its images past the
    last condition are dropped."""
    count, per_step = len(labels), batch_size * env.world_size
    steps = -(-count // per_step)
    padded = torch.cat([labels, labels.new_zeros(steps * per_step - count, *labels.shape[1:])])
    for step in tqdm(range(steps), desc="sampling", unit="batch", disable=not env.is_main):
        batch = step * env.world_size + env.rank
        _, images = sampler.generate(padded[batch * batch_size:(batch + 1) * batch_size], seed, batch)
        pixels = dist.all_gather_cat(to_uint8(images).to(env.device)).cpu().numpy()  # (world * bs, H, W, 3)
        yield step * per_step, images, pixels[:count - step * per_step]


def result_dir(args: argparse.Namespace, sampler: Sampler) -> str:
    """The official layout of the sampling scripts' results, created with its samples/ folder:
    <save dir>/logs_fid/(valid|valid_ema)/<ckpt>_temp_..._top_p_.../<timestamp>_<seed>, where <save dir> is the
    folder of -a, or --save-dir/<grandparent>_<parent of -a>."""
    ckpt = os.path.abspath(args.model_ar_path)
    parent = os.path.dirname(ckpt)
    root = (os.path.join(args.save_dir, f"{os.path.basename(os.path.dirname(parent))}_{os.path.basename(parent)}")
            if args.save_dir else parent)
    name = f"{os.path.basename(ckpt).split('.')[0]}_{sampler.folder_name()}"
    stamp = f"{datetime.now().strftime('%d%m%Y_%H%M%S')}_{args.seed}"
    path = os.path.join(root, "logs_fid", "valid_ema" if sampler.use_ema else "valid", name, stamp)
    os.makedirs(os.path.join(path, "samples"))
    return path

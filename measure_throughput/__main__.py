"""Sampling speed of the RQ-Transformer with random weights, measured as in the paper.

    python -m measure_throughput f=32 d=4 c=16384 model=huge batch_size=100
    python -m measure_throughput f=32 d=4 c=16384 model=small batch_size=8 device=cpu samples_per_loop=16

Keys (key=value): f (32, 16, 8: 8x8, 16x16 or 32x32 codes of 256x256 images), d (code depth; 1 = no
depth transformer), c (codebook size), model (huge, large, medium, small, vqgan_large, vqgan_huge, and
our tiny for smoke runs), batch_size, n_loop, warmup (loops left out of the average). Ours:
samples_per_loop (1000, as officially), device (auto, cpu, cuda), precision (fp32, as officially, or
bf16 autocast), threads (CPU threads), ch (the RQ-VAE's base width: 128; smaller only for smoke runs),
cached (false: a full forward pass per code).

Every loop samples `samples_per_loop` images of class 0 in batches, top-k and top-p off, then decodes
them (a batch at a time; the official script decodes one image at a time). It prints ms per image for
the autoregressive part and for decoding, timed with CUDA events on a GPU and perf_counter on CPU.
"""
from __future__ import annotations

import contextlib
import math
import platform
import sys
import time

import torch

from common.config import Config, Field, parse_overrides, validate
from common.dist import intra_op_threads, resolve_device
from common.errors import ConfigError, cli_entry
from measure_throughput.presets import PRIORS, TOKENIZERS, prior_arch, tokenizer_arch
from rqvae.transformer import RQTransformer
from rqvae.vqvae import RQVAE

SCHEMA = {
    "f": Field(int, 32, choices=tuple(TOKENIZERS)),
    "d": Field(int, 4),
    "c": Field(int, 16384),
    "model": Field(str, "huge", choices=tuple(PRIORS)),
    "batch_size": Field(int, 50),
    "n_loop": Field(int, 6),
    "warmup": Field(int, 1),
    "samples_per_loop": Field(int, 1000),
    "device": Field(str, "auto"),
    "precision": Field(str, "fp32", choices=("fp32", "bf16")),
    "threads": Field(int, None),
    "ch": Field(int, 128),
    "cached": Field(bool, True),
    "seed": Field(int, 0),
}


class Stopwatch:
    """Marks in time: CUDA events on a GPU (nothing waits inside the loop), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self, start: int, end: int) -> float:
        if self.cuda:
            return self.marks[start].elapsed_time(self.marks[end]) / 1000
        return self.marks[end] - self.marks[start]


def parse_args(argv: list[str]):
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        sys.exit(0)
    args = validate(parse_overrides(argv), SCHEMA, "measure_throughput")
    for key in ("d", "c", "batch_size", "n_loop", "samples_per_loop", "ch"):
        if args[key] < 1:
            raise ConfigError(f"measure_throughput: {key} must be at least 1, got {args[key]}")
    if not 0 <= args.warmup < args.n_loop:
        raise ConfigError(f"measure_throughput: warmup must be in [0, n_loop), got warmup={args.warmup} "
                          f"n_loop={args.n_loop}")
    return args


def build_models(args, device: torch.device) -> tuple[RQVAE, RQTransformer]:
    """The preset RQ-VAE and RQ-Transformer with random weights, the prior reading the RQ-VAE's codebook."""
    torch.manual_seed(args.seed)
    tokenizer = RQVAE.from_config(tokenizer_arch(args.f, args.d, args.c, args.ch), source="measure_throughput")
    prior = RQTransformer.from_config(prior_arch(args.model, args.f, args.d, args.c), source="measure_throughput")
    prior.set_codebook_from(tokenizer)
    return tokenizer.to(device).eval(), prior.to(device).eval()


def millions(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@torch.no_grad()
def run_loop(tokenizer: RQVAE, prior: RQTransformer, args, device: torch.device) -> tuple[float, float, float]:
    """One loop: (wall seconds, autoregressive seconds, decoding seconds)."""
    cond = torch.zeros(args.batch_size, dtype=torch.long, device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    watch = Stopwatch(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(math.ceil(args.samples_per_loop / args.batch_size)):
        watch.mark()
        with autocast:
            codes = prior.generate(cond, cached=args.cached)
        watch.mark()
        (0.5 * tokenizer.decode_tokens(codes) + 0.5).clamp(0, 1)
        watch.mark()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    ar = sum(watch.seconds(i, i + 1) for i in range(0, len(watch.marks), 3))
    decode = sum(watch.seconds(i + 1, i + 2) for i in range(0, len(watch.marks), 3))
    return wall, ar, decode


@cli_entry
def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with intra_op_threads(args.threads):
        return measure(args)


def measure(args: Config) -> dict[str, float]:
    """Time the sampling loops of the preset `args` describes; prints the table and returns the means."""
    device = resolve_device(args.device)
    tokenizer, prior = build_models(args, device)

    images_per_loop = math.ceil(args.samples_per_loop / args.batch_size) * args.batch_size
    title = (f"f{args.f}-{args.model}-d{args.d}-c{args.c}-bs{args.batch_size}, {args.precision}, "
             f"{'cached' if args.cached else 'uncached'}, sampling loops {args.warmup + 1}-{args.n_loop}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(title)
    print(f"python: {platform.python_version()}, torch: {torch.__version__}, device: {where}")
    print(f"rqvae size: {millions(tokenizer):.1f}M, rqtransformer size: {millions(prior):.1f}M, "
          f"{images_per_loop} images per loop")
    print("-" * 80)
    kept = []
    for index in range(args.n_loop):
        wall, ar, decode = (seconds * 1000 / images_per_loop for seconds in run_loop(tokenizer, prior, args, device))
        print(f"{index + 1}/{args.n_loop} | {wall:.1f} ms/sample (ar: {ar:.1f}, decode: {decode:.1f})"
              + (" (warm-up)" if index < args.warmup else ""))
        if index >= args.warmup:
            kept.append((wall, ar, decode))
    print("-" * 80)
    wall, ar, decode = (sum(loop[i] for loop in kept) / len(kept) for i in range(3))
    print(f"{title} | {wall:.4f} ms/sample (ar: {ar:.4f}, decode: {decode:.4f}), {1000 / wall:.2f} images/s")
    print("=" * 80)
    return {"ms_per_sample": wall, "ms_per_sample_ar": ar, "ms_per_sample_decode": decode}


if __name__ == "__main__":
    main()

"""Our MAR sampler against the official one (LTH14/mar): same random weights, same seed, same outputs.

    python benchmarks/bench_mar_sampling.py --official-repo PATH [--batch-sizes 4 16] [--repeats 5] [--threads 2]
    python benchmarks/bench_mar_sampling.py --official-repo PATH --device cuda --precision bf16 \\
        --num-iter 256 --num-sampling-steps 100 --batch-sizes 64 256

PATH is a checkout of LTH14/mar, or its git directory (a bare clone or a mirror): then its `models/` and
`diffusion/` are written to a temporary folder for the run. Nothing of it is kept in this repository. The
official code needs timm; on CPU its hard-wired `.cuda()` calls are made no-ops while it samples.

Both samplers get the named model (default MAR-B with its released DiffLoss, 6 blocks of 1024) with the
same random weights: the usual initialisation, then Gaussian noise on every weight (--weight-noise), or
DiffLoss's zero-initialised modulation and output layers would make every sample pure noise whatever the
transformer says. Before every run torch's and numpy's global generators are seeded alike; ours runs with
generator=None, which draws from them exactly as the official sampler does, and the script stops unless
both give the same latents (max abs difference <= --tolerance x the largest value; with random weights
the first reverse step amplifies the noise prediction ~1e4 times, so latents reach 1e5). Timing follows
benchmarks/protocol.py: the samplers take turns in alternating order, each time is the median (and
min-max) of --repeats wall-clock runs, the load average is printed at the start and the end, and no
table comes from a busy machine.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from typing import Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.official_code import import_official, official_checkout, require  # noqa: E402
from benchmarks.protocol import (Protocol, add_protocol_flags, device_note, print_header, seeded_labels,  # noqa: E402
                                 speedup, timed_call)
from common.errors import ConfigError, cli_entry  # noqa: E402
from mar.model import MAR, MAR_MODELS, MAR_SETTINGS  # noqa: E402

OFFICIAL_PACKAGES = ("models", "diffusion")
# the released models' data settings (256 px ImageNet, KL-16 latents), for both samplers
DATA_SETTINGS = {"img_size": 256, "vae_stride": 16, "patch_size": 1, "vae_embed_dim": 16, "class_num": 1000}


# ----------------------------------------------------------------------------------------------
# The official sampler, imported at run time (never kept in this repository)
# ----------------------------------------------------------------------------------------------

def import_official_mar(repo: str):
    """The official `models.mar` module (renamed `official_models.mar` after the import) and its commit."""
    require("timm")
    with official_checkout(repo, OFFICIAL_PACKAGES, "models/mar.py", "LTH14/mar") as (source, commit):
        return import_official(source, "models.mar", OFFICIAL_PACKAGES), commit


@contextlib.contextmanager
def cuda_calls_stay_put(device: torch.device) -> Iterator[None]:
    """On CPU, `Tensor.cuda()` returns the tensor itself (the official sampler calls it unconditionally)."""
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def official_sampler(module, name: str, ours: MAR, steps: str, device: torch.device) -> Callable:
    """A function (labels, knobs) -> latents running the official sampler with our model's weights."""
    settings = MAR_SETTINGS[name]
    model = getattr(module, name)(**DATA_SETTINGS, buffer_size=ours.buffer_size, diffloss_d=settings["diffloss_d"],
                                  diffloss_w=settings["diffloss_w"], num_sampling_steps=steps)
    model.load_state_dict(ours.state_dict())
    model = model.to(device).eval()

    def sample(labels: torch.Tensor, knobs: dict) -> torch.Tensor:
        with cuda_calls_stay_put(device):
            return model.sample_tokens(len(labels), num_iter=knobs["num_iter"], cfg=knobs["cfg"],
                                       cfg_schedule=knobs["cfg_schedule"], labels=labels,
                                       temperature=knobs["temperature"])

    return sample


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def timed(sample: Callable, labels: torch.Tensor, knobs: dict, args: argparse.Namespace, device: torch.device
          ) -> tuple[float, torch.Tensor]:
    """Wall-clock seconds of one seeded call and its latents (float32, on the CPU)."""
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())

    def call() -> torch.Tensor:
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        with torch.no_grad(), autocast:
            return sample(labels, knobs)

    seconds, latents = timed_call(call, device)
    return seconds, latents.float().cpu()


@cli_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-repo", default=None,
                        help="checkout or git directory of LTH14/mar (without it only our sampler is timed)")
    parser.add_argument("--model", default="mar_base", choices=tuple(MAR_MODELS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--num-iter", type=int, default=16)
    parser.add_argument("--num-sampling-steps", default="25")
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--cfg-schedule", default="linear", choices=("linear", "constant"))
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-noise", type=float, default=0.02, help="std of the noise added to every weight")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest allowed max abs difference relative to the largest value (default 1e-4 in "
                             "fp32; bf16 is not checked unless given: the two round differently)")
    add_protocol_flags(parser)
    args = parser.parse_args()
    if args.num_iter < 1 or min(args.batch_sizes) < 1:
        raise ConfigError("--num-iter and --batch-sizes must be >= 1")
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if args.precision == "fp32" else None)
    protocol = Protocol.start(args)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    ours = MAR_MODELS[args.model](**DATA_SETTINGS, num_sampling_steps=args.num_sampling_steps)
    noise = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for param in ours.parameters():
            param.add_(args.weight_noise * torch.randn(param.shape, generator=noise))
    ours = ours.to(device).eval()
    knobs = {"num_iter": args.num_iter, "cfg": args.cfg, "cfg_schedule": args.cfg_schedule,
             "temperature": args.temperature}
    samplers = {"ours": lambda labels, k: ours.generate(labels, num_sampling_steps=args.num_sampling_steps, **k)}

    official = "-"
    if args.official_repo:
        module, official = import_official_mar(args.official_repo)
        samplers = {"official": official_sampler(module, args.model, ours, args.num_sampling_steps, device),
                    **samplers}
    warm_up = {**knobs, "num_iter": 2}
    for sample in samplers.values():
        timed(sample, torch.zeros(2, dtype=torch.long, device=device), warm_up, args, device)

    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"MAR sampling: {args.model} ({params:.1f}M parameters, random weights), {args.num_iter} iterations x "
          f"{args.num_sampling_steps} diffusion steps, cfg {args.cfg} {args.cfg_schedule}, temperature "
          f"{args.temperature}, {args.precision} on {device_note(device)}"
          f", wall time, median (min-max) of {args.repeats}; official code {official}")
    header = (f"{'batch':>5} | {'official s':>20} | {'ours s':>20} | {'official images/s':>17} | "
              f"{'ours images/s':>13} | {'speed-up':>19} | {'max abs diff':>12} | {'max abs value':>13}")
    print_header(header)
    for batch_size in args.batch_sizes:
        labels = seeded_labels(ours.num_classes, batch_size, args.seed, device)
        runs = protocol.alternate({name: functools.partial(timed, sample, labels, knobs, args, device)
                                   for name, sample in samplers.items()}, f"batch {batch_size}")
        rate = {name: batch_size / result.spread.median for name, result in runs.items()}
        if "official" not in runs:
            print(f"{batch_size:>5} | {'-':>20} | {str(runs['ours'].spread):>20} | {'-':>17} | "
                  f"{rate['ours']:>13.3f} | {'-':>19} | {'-':>12} | {'-':>13}", flush=True)
            continue
        reference = runs["official"].outputs[0]
        largest = reference.abs().max().item()
        difference = max((latents - reference).abs().max().item()
                         for result in runs.values() for latents in result.outputs)
        if tolerance is not None and not difference <= tolerance * largest:
            raise SystemExit(f"batch {batch_size}: our latents differ from the official ones by {difference:.3g} "
                             f"(largest value {largest:.3g}, tolerance {tolerance:g} of it): not the same sampler")
        print(f"{batch_size:>5} | {str(runs['official'].spread):>20} | {str(runs['ours'].spread):>20} | "
              f"{rate['official']:>17.3f} | {rate['ours']:>13.3f} | "
              f"{speedup(runs['official'].spread, runs['ours'].spread):>19} | {difference:>12.3g} | "
              f"{largest:>13.3g}", flush=True)
    protocol.finish()


if __name__ == "__main__":
    main()

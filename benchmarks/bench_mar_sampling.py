"""Our MAR sampler against the official one (LTH14/mar): same random weights, same seed, same outputs.

    python benchmarks/bench_mar_sampling.py --official-repo PATH [--batch-sizes 4 16] [--repeats 3] [--threads 2]
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
the first reverse step amplifies the noise prediction ~1e4 times, so latents reach 1e5). The samplers
take turns, in alternating order, and each time is the median of --repeats wall-clock runs; the load
average of the machine (1 minute, before each run) is printed beside it, because other load changes
the numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import ConfigError, cli_entry  # noqa: E402
from mar.model import MAR, MAR_MODELS, MAR_SETTINGS  # noqa: E402

OFFICIAL_PACKAGES = ("models", "diffusion")
# the released models' data settings (256 px ImageNet, KL-16 latents), for both samplers
DATA_SETTINGS = {"img_size": 256, "vae_stride": 16, "patch_size": 1, "vae_embed_dim": 16, "class_num": 1000}


# ----------------------------------------------------------------------------------------------
# The official sampler, imported at run time (never kept in this repository)
# ----------------------------------------------------------------------------------------------

def official_sources(repo: str, scratch: str) -> tuple[str, str]:
    """A folder holding the official `models/` and `diffusion/` packages, and the commit (or 'checkout')."""
    if os.path.isfile(os.path.join(repo, "models", "mar.py")):
        return repo, "checkout"
    git = ["git", f"--git-dir={repo}"]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        archive = subprocess.run([*git, "archive", "HEAD", *OFFICIAL_PACKAGES], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise ConfigError(f"--official-repo {repo}: neither a checkout of LTH14/mar (no models/mar.py) nor a git "
                          "directory whose HEAD has models/ and diffusion/") from None
    subprocess.run(["tar", "-x", "-C", scratch], input=archive, check=True)
    return scratch, commit[:12]


def import_official_mar(source: str):
    """The official `models.mar` module. Any modules named like its packages are set aside while it is
    imported, and the official ones are renamed `official_<name>` after."""
    try:
        importlib.import_module("timm")
    except ImportError:
        raise ConfigError("--official-repo: the official code needs timm; pip install timm") from None
    ours = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in OFFICIAL_PACKAGES}
    sys.path.insert(0, os.path.abspath(source))
    try:
        return importlib.import_module("models.mar")
    finally:
        sys.path.remove(os.path.abspath(source))
        for name in [name for name in sys.modules if name.split(".")[0] in OFFICIAL_PACKAGES]:
            sys.modules[f"official_{name}"] = sys.modules.pop(name)
        sys.modules.update(ours)


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
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        latents = sample(labels, knobs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, latents.float().cpu()


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
    parser.add_argument("--repeats", type=int, default=3, help="runs per sampler and batch size; the median counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-noise", type=float, default=0.02, help="std of the noise added to every weight")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest allowed max abs difference relative to the largest value (default 1e-4 in "
                             "fp32; bf16 is not checked unless given: the two round differently)")
    args = parser.parse_args()
    if args.repeats < 1 or args.num_iter < 1 or min(args.batch_sizes) < 1:
        raise ConfigError("--repeats, --num-iter and --batch-sizes must be >= 1")
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if args.precision == "fp32" else None)
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
        with tempfile.TemporaryDirectory(prefix="official-mar-") as scratch:  # imported, the files can go
            source, official = official_sources(args.official_repo, scratch)
            module = import_official_mar(source)
        samplers = {"official": official_sampler(module, args.model, ours, args.num_sampling_steps, device),
                    **samplers}
    warm_up = {**knobs, "num_iter": 2}
    for sample in samplers.values():
        timed(sample, torch.zeros(2, dtype=torch.long, device=device), warm_up, args, device)

    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"MAR sampling: {args.model} ({params:.1f}M parameters, random weights), {args.num_iter} iterations x "
          f"{args.num_sampling_steps} diffusion steps, cfg {args.cfg} {args.cfg_schedule}, temperature "
          f"{args.temperature}, {args.precision} on {device}"
          + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")
          + f", wall time, median of {args.repeats}; official code {official}")
    header = (f"{'batch':>5} | {'official images/s':>17} | {'ours images/s':>13} | {'speed-up':>8} | "
              f"{'max abs diff':>12} | {'max abs value':>13} | load avg (1 min)")
    print(header)
    print("-" * len(header))
    for batch_size in args.batch_sizes:
        labels = torch.randint(0, ours.num_classes, (batch_size,), generator=torch.Generator().manual_seed(
            args.seed)).to(device)
        runs: dict[str, list[tuple[float, torch.Tensor]]] = {name: [] for name in samplers}
        loads = []
        for repeat in range(args.repeats):  # in turns, so that load from elsewhere hits both alike
            for name in (list(samplers) if repeat % 2 == 0 else list(reversed(samplers))):
                loads.append(os.getloadavg()[0])
                runs[name].append(timed(samplers[name], labels, knobs, args, device))
        seconds = {name: statistics.median(s for s, _ in results) for name, results in runs.items()}
        rate = {name: batch_size / s for name, s in seconds.items()}
        load = f"{min(loads):.1f}-{max(loads):.1f}"
        if "official" not in runs:
            print(f"{batch_size:>5} | {'-':>17} | {rate['ours']:>13.3f} | {'-':>8} | {'-':>12} | {'-':>13} | {load}")
            continue
        reference = runs["official"][0][1]
        largest = reference.abs().max().item()
        difference = max((latents - reference).abs().max().item() for _, latents in runs["ours"] + runs["official"])
        if tolerance is not None and not difference <= tolerance * largest:
            raise SystemExit(f"batch {batch_size}: our latents differ from the official ones by {difference:.3g} "
                             f"(largest value {largest:.3g}, tolerance {tolerance:g} of it): not the same sampler")
        print(f"{batch_size:>5} | {rate['official']:>17.3f} | {rate['ours']:>13.3f} | "
              f"{seconds['official'] / seconds['ours']:>7.2f}x | {difference:>12.3g} | {largest:>13.3g} | {load}",
              flush=True)


if __name__ == "__main__":
    main()

"""Our KV-cached RQ-Transformer sampler against the official one (kakaobrain/rq-vae-transformer), same weights.

    python benchmarks/bench_rqtransformer_vs_official.py --official-repo ../rq-vae-transformer --threads 2
    python benchmarks/bench_rqtransformer_vs_official.py --model medium --batch-sizes 32 --device cuda \\
        --precision bf16 --official-repo ../rq-vae-transformer

The prior is a measure_throughput preset (default `small`: 90M parameters, 8x8x4 codes of a
16384-code book) with random weights, sampling class 0 with top-k and top-p off as measure_throughput
does (--top-k / --top-p set both samplers' filters). With --official-repo, a checkout of the official
code or its git directory (it needs `pip install omegaconf`), the official RQTransformer is built from
the same config, loads the same weights and samples from the same seed, and the table gives the
speed-up and whether both drew the same codes; without it only our numbers are printed. `--uncached`
adds our full-forward path (slow: one forward pass per code). Timing follows benchmarks/protocol.py:
the samplers take turns, each time is the median (and min-max) of --repeats runs, and no table comes
from a busy machine.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import os
import sys
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.official_code import import_official, official_checkout, require  # noqa: E402
from benchmarks.protocol import (Protocol, add_protocol_flags, device_note, print_header, speedup,  # noqa: E402
                                 timed_call)
from common.errors import ConfigError, cli_entry  # noqa: E402
from measure_throughput.presets import PRIORS, prior_arch  # noqa: E402
from rqvae.transformer import RQTransformer  # noqa: E402


# ----------------------------------------------------------------------------------------------
# The official sampler, imported at run time from a checkout (never kept in this repository)
# ----------------------------------------------------------------------------------------------

def dataclass_with_default_factories(original: Callable) -> Callable:
    """`dataclasses.dataclass` that turns dataclass-instance defaults into default factories: the official
    config module uses such defaults, which Python >= 3.11 rejects."""

    def decorate(cls=None, **kwargs):
        def wrap(klass):
            for name, value in list(vars(klass).items()):
                if dataclasses.is_dataclass(value) and not isinstance(value, type):
                    setattr(klass, name, dataclasses.field(default_factory=functools.partial(copy.deepcopy, value)))
            return original(klass, **kwargs)

        return wrap if cls is None else wrap(cls)

    return decorate


@contextlib.contextmanager
def lenient_dataclasses() -> Iterator[None]:
    original = dataclasses.dataclass
    dataclasses.dataclass = dataclass_with_default_factories(original)
    try:
        yield
    finally:
        dataclasses.dataclass = original


def import_official_rqtransformer(repo: str):
    """The official `rqvae.models.rqtransformer` module, renamed `official_rqvae...` beside ours (same package name)."""
    require("omegaconf")
    with official_checkout(repo, ("rqvae",), "rqvae/models/rqtransformer/__init__.py",
                           "kakaobrain/rq-vae-transformer") as (source, _), lenient_dataclasses():
        return import_official(source, "rqvae.models.rqtransformer", ("rqvae",))


class CodebookLookup:
    """What the official sampler asks of its RQ-VAE: the code vectors of every depth (a shared codebook)."""

    def __init__(self, codebook: torch.Tensor):
        self.codebook = codebook

    def get_code_emb_with_depth(self, codes: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.embedding(codes, self.codebook), None


def official_sampler(repo: str, arch: dict, ours: RQTransformer, device: torch.device) -> Callable:
    """A function (cond, top_k, top_p) -> codes running the official sampler with our prior's weights."""
    module = import_official_rqtransformer(repo)
    from omegaconf import OmegaConf  # present: the import above checked it
    model = module.RQTransformer(module.RQTransformerConfig.create(OmegaConf.create(arch)))
    model.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "codebook"})
    model = model.to(device).eval()
    aux = CodebookLookup(ours.codebook)

    def sample(cond, top_k, top_p):
        empty = torch.zeros(len(cond), *ours.block_size, dtype=torch.long, device=device)
        return model.sample(empty, aux, cond=cond, top_k=top_k, top_p=top_p)

    return sample


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def timed(sample: Callable, cond: torch.Tensor, args: argparse.Namespace, device: torch.device
          ) -> tuple[float, torch.Tensor]:
    """Seconds of one call (seeded global RNG, as the official sampler draws from it) and its codes."""
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())

    def call() -> torch.Tensor:
        torch.manual_seed(args.seed)
        with torch.no_grad(), autocast:
            return sample(cond, args.top_k, args.top_p)

    return timed_call(call, device, time.process_time if args.clock == "cpu" else time.perf_counter)


@cli_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=tuple(PRIORS), help="measure_throughput preset")
    parser.add_argument("--f", type=int, default=32, help="downsampling factor (32: 8x8 codes)")
    parser.add_argument("--d", type=int, default=4, help="code depth")
    parser.add_argument("--c", type=int, default=16384, help="codebook size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="cpu: this process's CPU time, steadier than wall time on a busy CPU machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--official-repo", default=None,
                        help="checkout or git directory of kakaobrain/rq-vae-transformer")
    parser.add_argument("--uncached", action="store_true", help="also time our uncached path (slow)")
    add_protocol_flags(parser)
    args = parser.parse_args()
    if min(args.batch_sizes) < 1:
        raise ConfigError("--batch-sizes must be >= 1")
    protocol = Protocol.start(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    arch = prior_arch(args.model, args.f, args.d, args.c)
    torch.manual_seed(args.seed)
    ours = RQTransformer.from_config(arch, source=f"preset {args.model}").to(device).eval()
    ours.codebook.normal_()
    samplers = {"ours, cached": lambda cond, k, p: ours.generate(cond, top_k=k, top_p=p)}
    if args.official_repo:
        samplers["official, cached"] = official_sampler(args.official_repo, arch, ours, device)
    if args.uncached:
        samplers["ours, uncached"] = lambda cond, k, p: ours.generate(cond, top_k=k, top_p=p, cached=False)
    for sample in samplers.values():  # warm-up
        timed(sample, torch.zeros(2, dtype=torch.long, device=device), args, device)

    h, w, d = ours.block_size
    print(f"RQ-Transformer sampling: preset {args.model} ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M), "
          f"{h}x{w}x{d} codes of {args.c}, top-k {args.top_k}, top-p {args.top_p}, {args.precision} on "
          f"{device_note(device)}, {args.clock} time; seconds per batch, median (min-max) of {args.repeats}")
    header = (f"{'batch':>5} | {'sampler':<16} | {'s / batch':>20} | {'images / s':>10} | {'ms / sample':>11} | "
              f"{'vs official':>19} | same codes as official")
    print_header(header)
    for batch_size in args.batch_sizes:
        cond = torch.zeros(batch_size, dtype=torch.long, device=device)
        runs = protocol.alternate({name: functools.partial(timed, sample, cond, args, device)
                                   for name, sample in samplers.items()}, f"batch {batch_size}")
        reference = runs.get("official, cached")
        for name, result in runs.items():
            seconds = result.spread.median
            ratio = speedup(reference.spread, result.spread) if reference else "-"
            same = str(all(torch.equal(codes, reference.outputs[0]) for codes in result.outputs)) if reference else "-"
            print(f"{batch_size:>5} | {name:<16} | {str(result.spread):>20} | {batch_size / seconds:>10.2f} | "
                  f"{1000 * seconds / batch_size:>11.1f} | {ratio:>19} | {same}", flush=True)
    protocol.finish()


if __name__ == "__main__":
    main()

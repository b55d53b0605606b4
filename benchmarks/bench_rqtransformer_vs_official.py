"""Our KV-cached RQ-Transformer sampler against the official one (kakaobrain/rq-vae-transformer), same weights.

    python benchmarks/bench_rqtransformer_vs_official.py --official-repo ../rq-vae-transformer --threads 1
    python benchmarks/bench_rqtransformer_vs_official.py --model medium --batch-sizes 32 --device cuda \\
        --precision bf16 --official-repo ../rq-vae-transformer

The prior is a measure_throughput preset (default `small`: 90M parameters, 8x8x4 codes of a
16384-code book) with random weights, sampling class 0 with top-k and top-p off as measure_throughput
does (--top-k / --top-p set both samplers' filters). With --official-repo, a checkout of the official
code (it needs `pip install omegaconf`), the official RQTransformer is built from the same config, loads
the same weights and samples from the same seed, and the table gives the speed-up and whether both drew
the same codes; without it only our numbers are printed. `--uncached` adds our full-forward path
(slow: one forward pass per code). Samplers take turns and each time is the best of --repeats runs, so
other load on the machine hits both alike.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import importlib
import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def import_official_rqtransformer(repo: str):
    """The official `rqvae.models.rqtransformer` module. Its package is also called `rqvae`, so ours is set
    aside in sys.modules while it is imported, and the official modules are renamed `official_rqvae...` after."""
    if not os.path.isdir(os.path.join(repo, "rqvae", "models", "rqtransformer")):
        raise ConfigError(f"--official-repo {repo}: no rqvae/models/rqtransformer in it; pass a checkout of "
                          "kakaobrain/rq-vae-transformer")
    try:
        importlib.import_module("omegaconf")
    except ImportError:
        raise ConfigError("--official-repo: the official code needs omegaconf; pip install omegaconf") from None
    ours = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] == "rqvae"}
    original = dataclasses.dataclass
    dataclasses.dataclass = dataclass_with_default_factories(original)
    sys.path.insert(0, os.path.abspath(repo))
    try:
        return importlib.import_module("rqvae.models.rqtransformer")
    finally:
        dataclasses.dataclass = original
        sys.path.pop(0)
        for name in [name for name in sys.modules if name.split(".")[0] == "rqvae"]:
            sys.modules[f"official_{name}"] = sys.modules.pop(name)
        sys.modules.update(ours)


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
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    with torch.no_grad(), autocast:
        codes = sample(cond, args.top_k, args.top_p)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start, codes


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
    parser.add_argument("--repeats", type=int, default=1, help="runs per sampler and batch size; the best counts")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="cpu: this process's CPU time, steadier than wall time on a busy CPU machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--official-repo", default=None, help="checkout of kakaobrain/rq-vae-transformer")
    parser.add_argument("--uncached", action="store_true", help="also time our uncached path (slow)")
    args = parser.parse_args()
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
          f"{h}x{w}x{d} codes of {args.c}, top-k {args.top_k}, top-p {args.top_p}, {args.precision} on {device}, "
          f"{args.clock} time"
          + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""))
    print(f"{'batch':>5} | {'sampler':<16} | {'s / batch':>9} | {'images / s':>10} | {'ms / sample':>11} | "
          f"{'vs official':>11} | same codes as official")
    print("-" * 100)
    for batch_size in args.batch_sizes:
        cond = torch.zeros(batch_size, dtype=torch.long, device=device)
        runs: dict[str, list] = {name: [] for name in samplers}
        for _ in range(args.repeats):  # in turns, so that load from elsewhere hits every sampler alike
            for name, sample in samplers.items():
                runs[name].append(timed(sample, cond, args, device))
        best = {name: min(seconds for seconds, _ in results) for name, results in runs.items()}
        reference = runs.get("official, cached")
        for name, results in runs.items():
            seconds = best[name]
            ratio = f"{best['official, cached'] / seconds:.2f}x" if reference else "-"
            same = str(torch.equal(results[0][1], reference[0][1])) if reference else "-"
            print(f"{batch_size:>5} | {name:<16} | {seconds:>9.2f} | {batch_size / seconds:>10.2f} | "
                  f"{1000 * seconds / batch_size:>11.1f} | {ratio:>11} | {same}")


if __name__ == "__main__":
    main()

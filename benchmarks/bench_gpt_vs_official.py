"""Our LlamaGen GPT sampler against the official `generate()` (FoundationVision/LlamaGen, or the NPP copy of it).

    python benchmarks/bench_gpt_vs_official.py --official-repo PATH [--model GPT-B] [--grid 8] \\
        [--batch-sizes 4 16] [--cfg 2.0] [--modes stochastic greedy] [--repeats 5] [--threads 2]

PATH is a checkout of LlamaGen or of PKU-YuanGroup/Next-Patch-Prediction (their `generate.py` is the
same), or its git directory; its `autoregressive/` and `utils/` are imported at run time and nothing of
them is kept here. The official model is built at the named size for a grid x grid code grid (8: 128 px
images, 16: 256 px) with random weights (the output layer drawn too: the official init zeroes it), saved
in the official checkpoint layout (`{"model", "args"}`) and loaded into ours through our loader of
official files, so both sample with the same weights. Before every run the global generator is seeded
alike (ours draws from it with generator=None, as the official sampler does) and the script stops
unless both give identical codes. `stochastic` samples with --temperature / --top-k / --top-p (top-k 0
and top-p 1: off, LlamaGen's FID setting); `greedy` is top-k 1, LlamaGen's greedy decoding. Timing
follows benchmarks/protocol.py (alternating runs, median and spread, no table from a busy machine).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.official_code import import_official, official_checkout  # noqa: E402
from benchmarks.protocol import (Protocol, add_protocol_flags, device_note, print_header, seeded_labels,  # noqa: E402
                                 speedup, timed_call)
from common.errors import ConfigError, cli_entry  # noqa: E402
from npp.gpt import GPT  # noqa: E402
from npp.official import load_official_gpt  # noqa: E402
from npp.schema import GPT_PRESETS  # noqa: E402

OFFICIAL_PACKAGES = ("autoregressive", "utils")
VOCAB_SIZE, NUM_CLASSES, DOWNSAMPLE = 16384, 1000, 16


def official_model_and_generate(repo: str, args: argparse.Namespace) -> tuple[torch.nn.Module, Callable, str]:
    """The official GPT of --model with random weights (seeded by --seed), its `generate` and its commit."""
    with official_checkout(repo, OFFICIAL_PACKAGES, "autoregressive/models/generate.py",
                           "FoundationVision/LlamaGen or PKU-YuanGroup/Next-Patch-Prediction") as (source, commit):
        gpt_module = import_official(source, "autoregressive.models.gpt", OFFICIAL_PACKAGES)
        generate_module = import_official(source, "autoregressive.models.generate", OFFICIAL_PACKAGES)
    torch.manual_seed(args.seed)
    model = gpt_module.GPT_models[args.model](vocab_size=VOCAB_SIZE, block_size=args.grid ** 2,
                                              num_classes=NUM_CLASSES, cls_token_num=1, model_type="c2i")
    torch.nn.init.normal_(model.output.weight, std=0.02)  # zero in the official init: every logit would be equal
    return model.eval(), generate_module.generate, commit


def ours_from_official_file(official: torch.nn.Module, args: argparse.Namespace) -> GPT:
    """Our GPT read by our loader from the official model saved as the official training script saves it."""
    released_args = argparse.Namespace(gpt_model=args.model, image_size=args.grid * DOWNSAMPLE,
                                       downsample_size=DOWNSAMPLE)
    with tempfile.TemporaryDirectory(prefix="gpt-bench-") as folder:
        path = os.path.join(folder, "c2i.pt")
        torch.save({"model": official.state_dict(), "args": released_args}, path)
        return load_official_gpt(path)[0]


def random_ours(args: argparse.Namespace) -> GPT:
    torch.manual_seed(args.seed)
    model = GPT(**GPT_PRESETS[args.model], vocab_size=VOCAB_SIZE, num_classes=NUM_CLASSES, image_tokens=args.grid ** 2)
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return model.eval()


def mode_knobs(mode: str, args: argparse.Namespace) -> dict:
    """The official `generate` keyword arguments of a mode (top_k 0 / top_p 1: off)."""
    if mode == "greedy":
        return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}


def print_profile(name: str, call: Callable[[], tuple[float, torch.Tensor]], rows: int = 20) -> None:
    """The operators of one call by self CPU time, grouped by input shapes, and each one's share of the call."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profiler:
        call()
    events = profiler.key_averages(group_by_input_shape=True)
    total = sum(event.self_cpu_time_total for event in events)
    print(f"\n{name}: operators by self CPU time (torch.profiler; its overhead inflates the small ones)")
    for event in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]:
        shapes = str(event.input_shapes)[:60]
        print(f"  {event.self_cpu_time_total / total:6.1%}  {event.count:>6} x {event.key:<45} {shapes}")


@cli_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-repo", default=None,
                        help="checkout or git directory of LlamaGen or Next-Patch-Prediction (without it only ours "
                             "is timed)")
    parser.add_argument("--model", default="GPT-B", choices=tuple(GPT_PRESETS))
    parser.add_argument("--grid", type=int, default=8, help="codes per side (8: 128 px, 16: 256 px images)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--cfg", type=float, default=2.0, help="guidance scale (the null half runs when > 1)")
    parser.add_argument("--cfg-interval", type=int, default=-1)
    parser.add_argument("--modes", nargs="+", default=["stochastic", "greedy"], choices=("stochastic", "greedy"))
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="stochastic mode's top-k (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="stochastic mode's top-p (1: off)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="bf16: autocast for both (codes are not compared: the two round differently)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="first print each sampler's operator profile at the first batch size and mode (one "
                             "run each, torch.profiler; matrix products split by shape: wqkv, wo, w1/w3, w2, head)")
    add_protocol_flags(parser)
    args = parser.parse_args()
    if args.grid < 1 or min(args.batch_sizes) < 1 or args.top_k < 0:
        raise ConfigError("--grid and --batch-sizes must be >= 1 and --top-k >= 0")
    protocol = Protocol.start(args)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())

    commit = "-"
    samplers: dict[str, Callable] = {}
    if args.official_repo:
        official, official_generate, commit = official_model_and_generate(args.official_repo, args)
        ours = ours_from_official_file(official, args).to(device)
        official = official.to(device)
        samplers["official"] = lambda labels, knobs: official_generate(
            official, labels, args.grid ** 2, cfg_scale=args.cfg, cfg_interval=args.cfg_interval, sample_logits=True,
            **knobs)
    else:
        ours = random_ours(args).to(device)
    samplers["ours"] = lambda labels, knobs: ours.generate(
        labels, cfg_scale=args.cfg, cfg_interval=args.cfg_interval, temperature=knobs["temperature"],
        top_k=knobs["top_k"] or None, top_p=knobs["top_p"] if knobs["top_p"] < 1 else None)

    def run(name: str, labels: torch.Tensor, knobs: dict) -> Callable[[], tuple[float, torch.Tensor]]:
        def call() -> torch.Tensor:
            torch.manual_seed(args.seed)  # both draw from the global generator
            with torch.no_grad(), autocast:
                return samplers[name](labels, knobs).reshape(len(labels), -1).long().cpu()
        return lambda: timed_call(call, device)

    for name in samplers:  # warm-up
        run(name, torch.zeros(1, dtype=torch.long, device=device), mode_knobs("greedy", args))()

    if args.profile:
        labels = torch.zeros(args.batch_sizes[0], dtype=torch.long, device=device)
        for name in samplers:
            print_profile(name, run(name, labels, mode_knobs(args.modes[0], args)))

    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"GPT sampling: {args.model} ({params:.1f}M parameters, random weights), {args.grid}x{args.grid} codes of "
          f"{VOCAB_SIZE}, cfg {args.cfg} (interval {args.cfg_interval}), {args.precision} on "
          f"{device_note(device)}; official code {commit}; seconds per batch, median (min-max) of {args.repeats}")
    header = (f"{'batch':>5} | {'mode':<10} | {'official s':>20} | {'ours s':>20} | {'speed-up':>19} | "
              f"{'ours images/s':>13} | same codes")
    print_header(header)
    for batch_size in args.batch_sizes:
        labels = seeded_labels(NUM_CLASSES, batch_size, args.seed, device)
        for mode in args.modes:
            knobs = mode_knobs(mode, args)
            runs = protocol.alternate({name: run(name, labels, knobs) for name in samplers},
                                      f"batch {batch_size}, {mode}")
            ours_runs = runs["ours"]
            if "official" not in runs:
                print(f"{batch_size:>5} | {mode:<10} | {'-':>20} | {str(ours_runs.spread):>20} | {'-':>19} | "
                      f"{batch_size / ours_runs.spread.median:>13.2f} | -", flush=True)
                continue
            reference = runs["official"].outputs[0]
            same = all(torch.equal(codes, reference) for r in runs.values() for codes in r.outputs)
            if not same and args.precision == "fp32":
                raise SystemExit(f"batch {batch_size}, {mode}: our codes differ from the official ones: not the same "
                                 "sampler")
            print(f"{batch_size:>5} | {mode:<10} | {str(runs['official'].spread):>20} | "
                  f"{str(ours_runs.spread):>20} | {speedup(runs['official'].spread, ours_runs.spread):>19} | "
                  f"{batch_size / ours_runs.spread.median:>13.2f} | {same}", flush=True)
    protocol.finish()


if __name__ == "__main__":
    main()

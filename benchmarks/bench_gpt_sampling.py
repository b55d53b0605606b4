"""LlamaGen GPT sampling speed (the NPP prior): KV-cached against uncached (the whole sequence per code).

    python benchmarks/bench_gpt_sampling.py [--model small|GPT-B|GPT-L|...] [--batch-size 8] [--cfg 2.0] \\
        [--device cpu|cuda] [--threads 2]

A random-weight GPT samples a 16x16 grid of codes from a 16384-entry codebook (256 steps) for class
0 with classifier-free guidance (the conditional and null halves as one batch). Both paths draw the
same codes from the same seed; the table says how much the cache saves. `small` (width 256, 4
layers) keeps the uncached path short on a CPU; the released sizes are for a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cached_vs_uncached import compare  # noqa: E402
from npp.gpt import GPT  # noqa: E402
from npp.schema import GPT_PRESETS  # noqa: E402

MODELS = {"small": {"dim": 256, "n_layer": 4, "n_head": 4}, **GPT_PRESETS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=tuple(MODELS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=2.0, help="guidance scale (1: no null half)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = GPT(**MODELS[args.model], vocab_size=16384, num_classes=1000, image_tokens=256).to(device).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)  # the official init zeroes it: every logit would be 0

    def sample(batch_size: int, cached: bool) -> torch.Tensor:
        labels = torch.zeros(batch_size, dtype=torch.long, device=device)
        generator = torch.Generator(device).manual_seed(0)
        return model.generate(labels, cfg_scale=args.cfg, cached=cached, generator=generator)

    sample(2, True)  # warm-up
    compare(lambda cached: sample(args.batch_size, cached), args.batch_size, device,
            f"GPT sampling ({args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M), 16x16 codes, "
            f"cfg {args.cfg}")


if __name__ == "__main__":
    main()

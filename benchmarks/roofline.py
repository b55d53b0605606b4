"""Where every sampler stands against this machine's two roofs: memory bandwidth and matrix-product peak.

    python benchmarks/roofline.py [--samplers rq gpt mar] [--batch-sizes 1 8 32 100] [--threads 2] [--device cpu]

The roofs are measured first: a triad in torch (a = b + s * c over arrays far larger than the caches,
3 x 4 bytes per element moved) gives the memory bandwidth, the best of a few large matrix products
(fp32 on the CPU, bf16 on CUDA) the arithmetic peak. Then each sampler, with random weights:

* rq: the RQ-Transformer `small` preset of measure_throughput (8x8x4 codes of 16384, top-k / top-p off);
* gpt: LlamaGen GPT-B on a --gpt-grid x --gpt-grid code grid (16: 256 px) with guidance --gpt-cfg;
* mar: MAR-B with its DiffLoss, --mar-num-iter iterations x --mar-steps diffusion steps, cfg 3 (few
  iterations by default: the per-image work scales with both, the fractions of the roofs hardly do).

Weight bytes read and FLOPs are counted, not estimated: one sampling call at batch 1 and one at batch
2 run under an interceptor of every aten operation, which adds the bytes of each parameter or buffer an
operation reads (for an embedding only the rows it gathers) and the FLOPs of the matrix products and
attention (torch.utils.flop_counter); both grow linearly with the batch, so batch B is extrapolated
from the two. Each batch size is then timed (--repeats runs, the median), and the table gives per
image the weight MB and GFLOPs, and per batch the achieved GB/s of weights (weight bytes / seconds) and
GFLOP/s with the fraction of each roof. A sampler that reads every weight once per step for the whole
batch is bandwidth bound at small batches and should reach the bandwidth roof there, and the matmul
roof at large ones. The load-average rules of benchmarks/protocol.py apply.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_mar_sampling import DATA_SETTINGS  # noqa: E402
from benchmarks.protocol import Protocol, add_protocol_flags, print_header, timed_call  # noqa: E402
from common.errors import ConfigError, cli_entry  # noqa: E402
from mar.model import MAR_MODELS  # noqa: E402
from measure_throughput.presets import prior_arch  # noqa: E402
from npp.gpt import GPT  # noqa: E402
from npp.schema import GPT_PRESETS  # noqa: E402
from rqvae.transformer import RQTransformer  # noqa: E402

aten = torch.ops.aten
ROW_READS = (aten.embedding.default, aten.index_select.default)  # (weight, indices): only the gathered rows are read


# ----------------------------------------------------------------------------------------------
# The roofs
# ----------------------------------------------------------------------------------------------

def best_seconds(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    call()  # warm-up
    return min(timed_call(call, device)[0] for _ in range(repeats))


def triad_bandwidth(device: torch.device, elements: int, repeats: int = 10) -> float:
    """Bytes per second of a = b + s * c (two arrays read, one written) over `elements` float32."""
    b, c = torch.rand(elements, device=device), torch.rand(elements, device=device)
    a = torch.empty_like(b)
    seconds = best_seconds(lambda: torch.add(b, c, alpha=3.0, out=a), device, repeats)
    return 3 * 4 * elements / seconds


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], repeats: int = 3) -> float:
    """FLOP/s of the fastest of square matrix products of the given sizes."""
    best = 0.0
    for n in sizes:
        x, y = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        best = max(best, 2 * n ** 3 / best_seconds(lambda: x @ y, device, repeats))
    return best


# ----------------------------------------------------------------------------------------------
# Counting what a sampling call reads and computes
# ----------------------------------------------------------------------------------------------

def distinct_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the distinct elements a (possibly broadcast) view covers."""
    return math.prod(size for size, stride in zip(tensor.shape, tensor.stride()) if stride != 0) * tensor.element_size()


class WeightReads(TorchDispatchMode):
    """Adds up the bytes of the model's parameters and buffers that every non-view aten operation reads."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        tensors = [*model.parameters(), *model.buffers()]
        self.storages = {t.untyped_storage().data_ptr() for t in tensors}
        self.bytes = 0

    def is_weight(self, value: object) -> bool:
        return isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in self.storages

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ROW_READS and self.is_weight(args[0]):
            weight, indices = args[0], args[-1]
            self.bytes += indices.numel() * math.prod(weight.shape[1:]) * weight.element_size()
        elif not func.is_view:
            self.bytes += sum(distinct_bytes(t) for t in tree_flatten((args, kwargs))[0] if self.is_weight(t))
        return func(*args, **kwargs)


CPU_ATTENTION = aten._scaled_dot_product_flash_attention_for_cpu
if CPU_ATTENTION not in flop_registry:  # torch counts its CUDA attention kernels, not the CPU one
    @register_flop_formula(CPU_ATTENTION)
    def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def count(sample: Callable[[int], object], model: torch.nn.Module, batch_size: int) -> tuple[int, int]:
    """(weight bytes read, FLOPs) of one `sample(batch_size)` call."""
    reads, flops = WeightReads(model), FlopCounterMode(display=False)
    with flops, reads:
        sample(batch_size)
    return reads.bytes, flops.get_total_flops()


# ----------------------------------------------------------------------------------------------
# The samplers
# ----------------------------------------------------------------------------------------------

def rq_sampler(args: argparse.Namespace, device: torch.device) -> tuple[str, torch.nn.Module, Callable[[int], object]]:
    torch.manual_seed(0)
    model = RQTransformer.from_config(prior_arch("small", 32, 4, 16384), source="preset small").to(device).eval()
    model.codebook.normal_()

    def sample(batch_size: int) -> torch.Tensor:
        return model.generate(torch.zeros(batch_size, dtype=torch.long, device=device),
                              generator=torch.Generator(device).manual_seed(0))

    return "RQ-Transformer small, 8x8x4 codes of 16384, filters off", model, sample


def gpt_sampler(args: argparse.Namespace, device: torch.device) -> tuple[str, torch.nn.Module, Callable[[int], object]]:
    torch.manual_seed(0)
    model = GPT(**GPT_PRESETS["GPT-B"], vocab_size=16384, num_classes=1000, image_tokens=args.gpt_grid ** 2)
    torch.nn.init.normal_(model.output.weight, std=0.02)
    model = model.to(device).eval()

    def sample(batch_size: int) -> torch.Tensor:
        labels = torch.arange(batch_size, device=device) % 1000
        return model.generate(labels, cfg_scale=args.gpt_cfg, generator=torch.Generator(device).manual_seed(0))

    return f"LlamaGen GPT-B, {args.gpt_grid}x{args.gpt_grid} codes of 16384, cfg {args.gpt_cfg}", model, sample


def mar_sampler(args: argparse.Namespace, device: torch.device) -> tuple[str, torch.nn.Module, Callable[[int], object]]:
    torch.manual_seed(0)
    model = MAR_MODELS["mar_base"](**DATA_SETTINGS, num_sampling_steps=str(args.mar_steps)).to(device).eval()

    def sample(batch_size: int) -> torch.Tensor:
        labels = torch.arange(batch_size, device=device) % 1000
        return model.generate(labels, generator=torch.Generator(device).manual_seed(0), num_iter=args.mar_num_iter,
                              num_sampling_steps=str(args.mar_steps), cfg=3.0)

    return (f"MAR-B, {args.mar_num_iter} iterations x {args.mar_steps} diffusion steps, cfg 3", model, sample)


SAMPLERS = {"rq": rq_sampler, "gpt": gpt_sampler, "mar": mar_sampler}


@cli_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=tuple(SAMPLERS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 100])
    parser.add_argument("--gpt-grid", type=int, default=16, help="GPT code grid side (16: 256 px)")
    parser.add_argument("--gpt-cfg", type=float, default=2.0, help="GPT guidance scale (GPT-B's)")
    parser.add_argument("--mar-num-iter", type=int, default=4)
    parser.add_argument("--mar-steps", type=int, default=10, help="MAR diffusion steps per iteration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    parser.add_argument("--triad-elements", type=int, default=1 << 25,
                        help="float32 elements per triad array (far beyond the caches)")
    parser.add_argument("--count-only", action="store_true",
                        help="print the weight bytes and FLOPs per image only: no roofs, no timing (no load check)")
    add_protocol_flags(parser, repeats=1)
    args = parser.parse_args()
    if min(args.batch_sizes) < 1 or args.gpt_grid < 1 or args.mar_num_iter < 1 or args.mar_steps < 1:
        raise ConfigError("--batch-sizes, --gpt-grid, --mar-num-iter and --mar-steps must be >= 1")
    protocol = None if args.count_only else Protocol.start(args)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    # the samplers' own arithmetic: bf16 autocast on CUDA (as the sampling scripts default to), fp32 on the CPU
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    if protocol:
        bandwidth = triad_bandwidth(device, args.triad_elements)
        peak = matmul_peak(device, torch.bfloat16 if cuda else torch.float32,
                           (4096, 8192) if cuda else (1024, 2048, 4096))
        print(f"roofs on {device}" + ("" if cuda else f", {torch.get_num_threads()} threads") +
              f": memory bandwidth {bandwidth / 1e9:.1f} GB/s (triad), matrix product {peak / 1e9:.1f} GFLOP/s "
              f"({'bf16' if cuda else 'fp32'})", flush=True)
    header = (f"{'sampler':<7} | {'batch':>5} | {'weight MB / image':>17} | {'GFLOP / image':>13} | {'s / batch':>9} | "
              f"{'weight GB/s':>11} | {'of bandwidth':>12} | {'GFLOP/s':>8} | {'of matmul peak':>14}")
    for name in args.samplers:
        title, model, sample = SAMPLERS[name](args, device)
        with torch.no_grad(), autocast:
            (bytes_1, flops_1), (bytes_2, flops_2) = (count(sample, model, b) for b in (1, 2))
        print(f"\n{name}: {title} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
        print_header(header)
        for batch_size in args.batch_sizes:
            weight_bytes = bytes_1 + (batch_size - 1) * (bytes_2 - bytes_1)
            flops = flops_1 + (batch_size - 1) * (flops_2 - flops_1)
            if not protocol:
                print(f"{name:<7} | {batch_size:>5} | {weight_bytes / batch_size / 1e6:>17.1f} | "
                      f"{flops / batch_size / 1e9:>13.2f} |", flush=True)
                continue

            def call(b: int = batch_size) -> object:
                with torch.no_grad(), autocast:
                    return sample(b)

            runs = protocol.alternate({name: functools.partial(timed_call, call, device)},
                                      f"{name}, batch {batch_size}")
            seconds = runs[name].spread.median
            print(f"{name:<7} | {batch_size:>5} | {weight_bytes / batch_size / 1e6:>17.1f} | "
                  f"{flops / batch_size / 1e9:>13.2f} | {seconds:>9.2f} | {weight_bytes / seconds / 1e9:>11.2f} | "
                  f"{weight_bytes / seconds / bandwidth:>11.0%} | {flops / seconds / 1e9:>8.1f} | "
                  f"{flops / seconds / peak:>13.0%}", flush=True)
    if protocol:
        protocol.finish()


if __name__ == "__main__":
    main()

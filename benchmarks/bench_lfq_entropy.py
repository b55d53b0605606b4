"""LFQ entropy losses: the official full softmax over all 2^K codes against the exact factorised form.

    python benchmarks/bench_lfq_entropy.py [--bits 10 14 18] [--tokens N] [--repeats 3] [--device auto]

Table 1, the quantizer loss: forward + backward of entropy_aux + 0.25 * commitment on N latent
vectors of K bits (the released setting is 8 images of 256 px, N = 2048 tokens, K = 18), time
(median) and peak memory, full vs factorized, and how far the two agree (entropies, gradient).
Table 2, a whole tokenizer training step (encoder, quantizer, decoder, L1 + entropy + commitment,
forward + backward) at each bit count, to show the quantizer loss no longer matters at 2^18.

Every case runs in a fresh process, after one unmeasured warm-up run. Peak memory is the CUDA
allocator's peak on a GPU and the growth of the resident set's high-water mark on CPU (Linux;
coarse, about +-1 MiB). The full form needs several
N x 2^K fp32 tensors (2 GiB each at N = 2048, K = 18), so on CPU the default N is 256 and the
default tokenizer is smaller (ch 32, 1 block per level, 128 px; the released one is ch 128,
4 blocks, 256 px); say --tokens 2048 to run the released size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lfq.model import LFQTokenizer  # noqa: E402
from lfq.quantizer import ENTROPY_MODES, LookupFreeQuantizer  # noqa: E402

CODEBOOK_WEIGHT, COMMIT_WEIGHT = 0.1, 0.25  # the released Open-MAGVIT2 loss weights


# ----------------------------------------------------------------------------------------------
# One case, in a child process
# ----------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_kib(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset), in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class PeakMemory:
    """Peak memory above the level at construction, in MiB: the CUDA allocator's peak, or on CPU the
    resident set's high-water mark (reset through /proc/self/clear_refs; the parent starts every
    child with a fixed malloc mmap threshold so that freed tensors leave the resident set)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current VmRSS
            self.base = resident_kib("VmRSS") * 1024

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = resident_kib("VmHWM") * 1024
        return max(0, peak - self.base) / 2 ** 20


def timed(step, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median milliseconds, peak MiB) of `step()` over `repeats` runs after an unmeasured warm-up run."""
    step()
    memory = PeakMemory(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), memory.peak_mib()


def run_loss_case(bits: int, mode: str, tokens: int, device: torch.device, repeats: int, grad_path: str) -> dict:
    quantizer = LookupFreeQuantizer(bits, entropy_mode=mode).train()
    z = torch.randn(1, bits, 1, tokens, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_()
    result = {}

    def step():
        z.grad = None
        _, losses, _ = quantizer(z)
        (losses.entropy_aux + COMMIT_WEIGHT * losses.commitment).backward()
        result.update(per_sample=losses.per_sample_entropy.item(), codebook=losses.codebook_entropy.item())

    ms, peak_mib = timed(step, device, repeats)
    torch.save(z.grad.cpu(), grad_path)
    return {"ms": ms, "peak_mib": peak_mib, **result}


def run_step_case(bits: int, mode: str, device: torch.device, repeats: int, ch: int, blocks: int, image_size: int,
                  batch: int) -> dict:
    torch.manual_seed(0)
    model = LFQTokenizer(ch, [1, 1, 2, 2, 4], blocks, bits, image_size, entropy_mode=mode)
    model = model.to(device).train()
    x = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1

    def step():
        model.zero_grad(set_to_none=True)
        recon, losses, _ = model(x)
        loss = (recon - x).abs().mean() + CODEBOOK_WEIGHT * losses.entropy_aux + COMMIT_WEIGHT * losses.commitment
        loss.backward()

    ms, peak_mib = timed(step, device, repeats)
    return {"ms": ms, "peak_mib": peak_mib}


# ----------------------------------------------------------------------------------------------
# The tables, in the parent process
# ----------------------------------------------------------------------------------------------

def child(args: argparse.Namespace, *case: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        out_path = out.name
    command = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--repeats", str(args.repeats),
               "--tokens", str(args.tokens), "--step-ch", str(args.step_ch), "--step-blocks", str(args.step_blocks),
               "--step-size", str(args.step_size),
               "--step-batch", str(args.step_batch), "--threads", str(args.threads), "--child", *case, out_path]
    try:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # large blocks are unmapped when freed
        subprocess.run(command, check=True, env=env)
        with open(out_path) as f:
            return json.load(f)
    finally:
        os.remove(out_path)


def loss_table(args: argparse.Namespace) -> None:
    print(f"\nQuantizer loss, forward + backward, N = {args.tokens} tokens, {args.device}, "
          f"median of {args.repeats}")
    print(f"{'codes':>6} | {'mode':>10} | {'ms':>10} | {'peak MiB':>9} | {'H_sample':>9} | {'H_codebook':>10} | "
          f"{'speed-up':>8} | {'memory':>7} | {'|dH| max':>8} | {'|dgrad| max':>11}")
    print("-" * 112)
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            rows = {}
            for mode in ENTROPY_MODES[::-1]:  # full first: the factorized row compares against it
                grad_path = os.path.join(tmp, f"{bits}_{mode}.pt")
                rows[mode] = child(args, "loss", str(bits), mode, grad_path)
                rows[mode]["grad"] = torch.load(grad_path, weights_only=True)
            for mode in ENTROPY_MODES[::-1]:
                row, full = rows[mode], rows["full"]
                compare = ""
                if mode == "factorized":
                    dh = max(abs(row["per_sample"] - full["per_sample"]), abs(row["codebook"] - full["codebook"]))
                    dgrad = float((row["grad"] - full["grad"]).abs().max())
                    compare = (f"{full['ms'] / row['ms']:>7.0f}x | 1/{full['peak_mib'] / max(row['peak_mib'], 0.01):<5.0f}"
                               f" | {dh:>8.1e} | {dgrad:>11.1e}")
                else:
                    compare = f"{'':>8} | {'':>7} | {'':>8} | {'':>11}"
                print(f"{'2^' + str(bits):>6} | {mode:>10} | {row['ms']:>10.2f} | {row['peak_mib']:>9.1f} | "
                      f"{row['per_sample']:>9.5f} | {row['codebook']:>10.5f} | {compare}")


def step_table(args: argparse.Namespace) -> None:
    f = 16
    tokens = args.step_batch * (args.step_size // f) ** 2
    print(f"\nTokenizer training step (L1 + entropy + commitment, forward + backward), ch {args.step_ch}, "
          f"ch_mult [1,1,2,2,4], {args.step_blocks} blocks, {args.step_batch} x {args.step_size} px ({tokens} tokens), {args.device}")
    print(f"{'codes':>6} | {'mode':>10} | {'ms':>10} | {'peak MiB':>9} | {'vs 2^' + str(args.bits[0]):>9}")
    print("-" * 56)
    reference = None
    for bits in args.bits:
        for mode in ENTROPY_MODES[::-1]:
            row = child(args, "step", str(bits), mode)
            if mode == "factorized" and reference is None:
                reference = row["ms"]
            ratio = f"{row['ms'] / reference:>8.2f}x" if mode == "factorized" else ""
            print(f"{'2^' + str(bits):>6} | {mode:>10} | {row['ms']:>10.1f} | {row['peak_mib']:>9.1f} | {ratio:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[10, 14, 18], help="code bits K (2^K codes)")
    parser.add_argument("--tokens", type=int, default=None, help="latent vectors N (default 2048 on CUDA, 256 on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (cuda > cpu), cpu, cuda")
    parser.add_argument("--step-ch", type=int, default=None, help="tokenizer width (default 128 on CUDA, 32 on CPU)")
    parser.add_argument("--step-blocks", type=int, default=None, help="residual blocks per level (default 4 on CUDA, 1 on CPU)")
    parser.add_argument("--step-size", type=int, default=None, help="image size (default 256 on CUDA, 128 on CPU)")
    parser.add_argument("--step-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads per case")
    parser.add_argument("--no-step", action="store_true", help="skip the tokenizer step table")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = args.device.startswith("cuda")
    args.tokens = args.tokens or (2048 if on_gpu else 256)
    args.step_ch = args.step_ch or (128 if on_gpu else 32)
    args.step_blocks = args.step_blocks or (4 if on_gpu else 1)
    args.step_size = args.step_size or (256 if on_gpu else 128)

    torch.set_num_threads(args.threads)
    if args.child:
        kind, bits, mode, *rest = args.child
        device = torch.device(args.device)
        if kind == "loss":
            result = run_loss_case(int(bits), mode, args.tokens, device, args.repeats, rest[0])
        else:
            result = run_step_case(int(bits), mode, device, args.repeats, args.step_ch, args.step_blocks,
                                   args.step_size, args.step_batch)
        with open(rest[-1], "w") as f:
            json.dump(result, f)
        return

    if not on_gpu and args.tokens < 2048:
        print(f"CPU run: N = {args.tokens} tokens instead of the released 2048 (the full 2^18 softmax needs "
              "several 2 GiB tensors at 2048); pass --tokens 2048 for the released size.")
    loss_table(args)
    if not args.no_step:
        step_table(args)


if __name__ == "__main__":
    main()

"""RQ-VAE stage-1 speed: training step time and encode / decode images per second (random weights).

    python benchmarks/bench_rqvae.py [--configs tiny ffhq] [--batch-size N] [--steps N] [--warmup N]
                                     [--device auto] [--threads N] [--amp] [--vgg-weights FILE]

"train step" is one RQVAEStage1Task.train_step on a synthetic batch: the generator step
(reconstruction, commitment, adversarial loss with the adaptive weight) and the discriminator
step; the GAN is switched on from the first step (gan.loss.disc_start=0). LPIPS is left out
(perceptual_weight=0) unless --vgg-weights is given, since its VGG16 weights are not downloaded.
"encode" is encode_tokens (images -> codes) and "decode" is decode_tokens (codes -> images), both in
eval mode; --amp runs these two under bf16 autocast on CUDA. The FFHQ config keeps its gradient
checkpointing (the official setting). 256 px is slow on CPU, hence the small CPU step counts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import dist  # noqa: E402
from common.config import load_config  # noqa: E402
from common.errors import cli_entry  # noqa: E402
from common.trainer import Position  # noqa: E402
from rqvae.stage1 import STAGE1_SCHEMA, RQVAEStage1Task  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "tiny": "configs/shapes/stage1/rqvae.yaml",
    "ffhq": "configs/ffhq/stage1/ffhq256-rqvae-8x8x4.yaml",
}
# (batch size, steps, warmup) when not given on the command line, by config and device type
DEFAULTS = {
    ("tiny", "cpu"): (32, 10, 2),
    ("ffhq", "cpu"): (4, 2, 1),
    ("tiny", "cuda"): (32, 50, 10),
    ("ffhq", "cuda"): (32, 20, 5),
}


def seconds_per_call(run, calls: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def build_task(name: str, env: dist.DistEnv, vgg_weights: str | None, steps_per_epoch: int) -> RQVAEStage1Task:
    overrides = {"gan.loss.disc_start": 0, "gan.loss.perceptual_weight": 1.0 if vgg_weights else 0.0}
    config = load_config(os.path.join(ROOT, CONFIGS[name]), STAGE1_SCHEMA, overrides)
    return RQVAEStage1Task(config, env, steps_per_epoch, vgg_weights)


def benchmark(name: str, args: argparse.Namespace, env: dist.DistEnv) -> list[str]:
    """Time one config; return the table cells of its row."""
    default_batch, default_steps, default_warmup = DEFAULTS[(name, env.device.type)]
    batch_size = args.batch_size or default_batch
    steps = args.steps or default_steps
    warmup = default_warmup if args.warmup is None else args.warmup
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(env.device)

    torch.manual_seed(0)
    task = build_task(name, env, args.vgg_weights, steps_per_epoch=steps + warmup)
    model = task.model
    size = model.image_size
    batch = {"image": torch.rand(batch_size, 3, size, size, device=env.device) * 2 - 1,
             "label": torch.zeros(batch_size, dtype=torch.long), "skipped": torch.zeros(batch_size, dtype=torch.long)}
    position = Position()
    train_s = seconds_per_call(lambda: task.train_step(batch, position), steps, warmup, env.device)

    model.eval()  # eval: encode_tokens would otherwise update the codebooks
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.amp and cuda else nullcontext()
    with autocast:
        codes = model.encode_tokens(batch["image"])  # (B, h, w, D)
        encode_s = seconds_per_call(lambda: model.encode_tokens(batch["image"]), steps, warmup, env.device)
        decode_s = seconds_per_call(lambda: model.decode_tokens(codes), steps, warmup, env.device)
    peak = f"{torch.cuda.max_memory_allocated(env.device) / 2**30:.2f}" if cuda else "-"
    code_shape = "x".join(str(n) for n in model.code_shape)
    return [name, f"{size}px -> {code_shape}", f"{batch_size}", str(env.device), f"{steps}/{warmup}", f"{1000 * train_s:.1f}",
            f"{batch_size / encode_s:.1f}", f"{batch_size / decode_s:.1f}", peak]


@cli_entry
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: 32 for tiny; 4 (CPU) or 32 (CUDA) for ffhq")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed calls per measurement (default: by config and device, see the table)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before each measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for encode / decode (CUDA only)")
    parser.add_argument("--vgg-weights", default=None,
                        help="local vgg16-397923af.pth: time the step with LPIPS (perceptual_weight=1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = dist.DistEnv(0, 1, 0, dist.resolve_device(args.device))
    cuda = env.device.type == "cuda"

    device_name = torch.cuda.get_device_name(env.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    lpips = "on (perceptual_weight=1)" if args.vgg_weights else "off (perceptual_weight=0; --vgg-weights to include)"
    amp = "bf16 autocast for encode/decode" if args.amp and cuda else "off" + (" (CUDA only)" if args.amp else "")
    print(f"RQ-VAE stage 1, random weights; device: {device_name}; LPIPS: {lpips}; amp: {amp}")
    header = ["config", "image -> codes", "batch", "device", "steps/warmup", "train step ms", "encode img/s", "decode img/s",
              "peak GiB"]
    print(" | ".join(header))
    print("-+-".join("-" * len(title) for title in header))
    for name in args.configs:
        cells = benchmark(name, args, env)
        print(" | ".join(cell.rjust(len(title)) for cell, title in zip(cells, header)), flush=True)


if __name__ == "__main__":
    main()

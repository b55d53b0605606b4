"""How fast Inception features are extracted for FID / IS on this device: images per second.

    python benchmarks/bench_inception.py [--count 512] [--resolution 256] [--batch-sizes 32 64 128 256]
                                          [--inception-weights FILE] [--device auto] [--workers 4]

Columns, for each batch size:
  tensors fp32   InceptionAccumulator.add on uint8 images already in memory, TF32 off (what we score with)
  tensors tf32   the same with TF32 allowed (cuDNN convolutions use it by default in PyTorch; CUDA only)
  PNG folder     extract_features over a folder of PNGs: decoding in --workers processes + extraction
  torch-fidelity torch_fidelity.calculate_metrics(isc=True) on the same folder: the stock path, network
                 construction included
Speed does not depend on the weights: without a local Inception file, random weights in the same
layout are used (and said so).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch_fidelity
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import dist  # noqa: E402
from common.errors import WeightsError  # noqa: E402
from common.metrics import (INCEPTION_FILE, InceptionAccumulator, extract_features,  # noqa: E402
                            find_inception_weights, load_inception, write_random_inception_weights)
from common.metrics.images import FolderImages  # noqa: E402


def write_pngs(folder: str, count: int, resolution: int) -> None:
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((resolution, resolution), Image.BICUBIC).save(f"{folder}/{index:05d}.png")


def images_per_second(run, count: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - start)


def from_tensors(extractor, images: torch.Tensor, batch_size: int, tf32: bool) -> None:
    accumulator = InceptionAccumulator(extractor, tf32=tf32)
    for batch in images.split(batch_size):
        accumulator.add(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=512, help="images per measurement")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--inception-weights", help="local Inception weights (default: hub cache, else random)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=4, help="PNG-decoding DataLoader workers")
    args = parser.parse_args()
    env = dist.DistEnv(0, 1, 0, dist.resolve_device(args.device))
    scratch = tempfile.TemporaryDirectory()
    try:
        weights = find_inception_weights(args.inception_weights)
    except WeightsError:
        weights = write_random_inception_weights(os.path.join(scratch.name, INCEPTION_FILE))
        print("note: no Inception weights found; timing random weights in the same layout")
    extractor = load_inception(weights, env.device)
    folder = os.path.join(scratch.name, "pngs")
    os.makedirs(folder)
    write_pngs(folder, args.count, args.resolution)
    images = torch.stack([FolderImages(folder)[i]["image"] for i in range(args.count)])  # (N, 3, H, W) uint8
    cuda = env.device.type == "cuda"
    name = torch.cuda.get_device_name(env.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {args.count} images of {args.resolution}x{args.resolution}; images/s")
    header = ["batch", "tensors fp32", "tensors tf32", f"PNG folder ({args.workers} workers)", "torch-fidelity"]
    print(" | ".join(header))
    print("-+-".join("-" * len(title) for title in header))
    from_tensors(extractor, images[: args.batch_sizes[0]], args.batch_sizes[0], tf32=False)  # warm-up
    for batch_size in args.batch_sizes:
        exact = images_per_second(lambda: from_tensors(extractor, images, batch_size, False), args.count, env.device)
        tf32 = images_per_second(lambda: from_tensors(extractor, images, batch_size, True), args.count,
                                 env.device) if cuda else float("nan")
        pipeline = images_per_second(
            lambda: extract_features(FolderImages(folder), InceptionAccumulator(extractor), env, batch_size,
                                     args.workers), args.count, env.device)
        stock = images_per_second(
            lambda: torch_fidelity.calculate_metrics(input1=folder, isc=True, cuda=cuda, batch_size=batch_size,
                                                     feature_extractor_weights_path=weights, verbose=False,
                                                     cache=False), args.count, env.device)
        cells = [f"{batch_size}", f"{exact:.0f}", f"{tf32:.0f}" if cuda else "-", f"{pipeline:.0f}", f"{stock:.0f}"]
        print(" | ".join(cell.rjust(len(title)) for cell, title in zip(cells, header)))
    scratch.cleanup()


if __name__ == "__main__":
    main()

"""How fast the built-in shapes are drawn: images per second at each resolution.

    python benchmarks/bench_shapes.py [--count 500] [--workers 2] [--batch-size 64]

"one process" times `dataset[i]` in a loop (drawing, flip, tensor conversion) on one thread, as
in a DataLoader worker; "loader" times a DataLoader with --workers workers, collation included.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.data import ShapesDataset, build_loader  # noqa: E402


def images_per_second(run, count: int) -> float:
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500, help="images per measurement")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader column")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128, 256])
    args = parser.parse_args()
    torch.set_num_threads(1)  # DataLoader workers run single-threaded; intra-op threads only add contention here

    loader_title = f"loader ({args.workers} workers) img/s"
    print(f"{'resolution':>10} | {'ms / image':>10} | {'one process img/s':>17} | {loader_title:>26}")
    print("-" * 73)
    for resolution in args.resolutions:
        dataset = ShapesDataset("train", resolution, num_samples=args.count, flip=True)
        dataset[0]  # warm-up
        single = images_per_second(lambda: [dataset[i] for i in range(args.count)], args.count)
        loader = build_loader(dataset, args.batch_size, num_workers=args.workers, drop_last=False)
        batched = images_per_second(lambda: [batch for batch in loader], args.count)
        print(f"{resolution:>10} | {1000 / single:>10.3f} | {single:>17.0f} | {batched:>26.0f}")


if __name__ == "__main__":
    main()

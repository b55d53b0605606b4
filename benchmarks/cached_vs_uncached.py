"""The table both sampling benchmarks print: a prior's KV-cached sampler against its uncached path."""
from __future__ import annotations

import time
from typing import Callable

import torch


def timed(sample: Callable[[bool], torch.Tensor], cached: bool, device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds of one `sample(cached)` call and its codes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    codes = sample(cached)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, codes


def compare(sample: Callable[[bool], torch.Tensor], batch_size: int, device: torch.device, title: str) -> None:
    """Time both paths (same seed inside `sample`), check they draw the same codes, print the table."""
    results = {cached: timed(sample, cached, device) for cached in (True, False)}
    same_codes = torch.equal(results[True][1], results[False][1])
    print(f"{title}, batch {batch_size}, {device}, {torch.get_num_threads()} threads; same codes: {same_codes}")
    print(f"{'path':>9} | {'s / batch':>9} | {'images / s':>10} | {'ms / sample':>11} | {'speed-up':>8}")
    print("-" * 60)
    for cached, label in ((False, "uncached"), (True, "cached")):
        seconds = results[cached][0]
        print(f"{label:>9} | {seconds:>9.2f} | {batch_size / seconds:>10.1f} | "
              f"{1000 * seconds / batch_size:>11.2f} | {results[False][0] / seconds:>7.1f}x")

"""What a run leaves on disk: train.log, metrics.jsonl, image grids. Only rank 0 writes."""
from __future__ import annotations

import json
import math
import os
import time

import torch
from tqdm import tqdm


class RunLog:
    """Rank-aware logging into a run directory; a no-op on every rank but 0."""

    def __init__(self, run_dir: str, is_main: bool = True):
        self.run_dir = run_dir
        self.is_main = is_main
        if is_main:
            os.makedirs(run_dir, exist_ok=True)

    def path(self, *parts: str) -> str:
        return os.path.join(self.run_dir, *parts)

    def info(self, message: str) -> None:
        if not self.is_main:
            return
        tqdm.write(message)
        with open(self.path("train.log"), "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def metrics(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl (floats rounded to 7 significant digits for reading)."""
        if not self.is_main:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        with open(self.path("metrics.jsonl"), "a") as f:
            f.write(json.dumps(clean) + "\n")

    def image_grid(self, name: str, images: torch.Tensor, nrow: int | None = None) -> str | None:
        """Save [-1, 1] images as `images/<name>.png`; returns the path (None off rank 0)."""
        if not self.is_main:
            return None
        from common.data import save_image_grid

        path = self.path("images", f"{name}.png")
        save_image_grid(images, path, nrow=nrow)
        return path


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.7g}")
    return value


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

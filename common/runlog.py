"""What a run leaves on disk: train.log, metrics.jsonl, image grids, TensorBoard event files. Only rank 0 writes."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable

import torch
from tqdm import tqdm

from common.tensorboard_log import TensorBoardLog


class RunLog:
    """Rank-aware logging into a run directory; a no-op on every rank but 0."""

    def __init__(self, run_dir: str, is_main: bool = True):
        self.run_dir = run_dir
        self.is_main = is_main
        self.tensorboard: TensorBoardLog | None = None
        if is_main:
            os.makedirs(run_dir, exist_ok=True)

    def open_tensorboard(self, purge_step: int) -> None:
        """From now on also write scalars and grids as TensorBoard event files; TensorBoard hides what an earlier
        run in this directory logged from `purge_step` on."""
        if self.is_main:
            self.tensorboard = TensorBoardLog(self.run_dir, purge_step)

    def close_tensorboard(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

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
        if self.tensorboard is not None:
            self.tensorboard.scalars(clean["step"], curve_values(clean))

    def keep_metrics(self, keep: Callable[[dict], bool]) -> None:
        """Rewrite metrics.jsonl (atomically) with only the records `keep` accepts; a line that a killed run cut
        short goes too."""
        path = self.path("metrics.jsonl")
        if not self.is_main or not os.path.isfile(path):
            return
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and keep(record):
                    kept.append(line.rstrip("\n") + "\n")
        with open(f"{path}.tmp", "w") as f:
            f.writelines(kept)
        os.replace(f"{path}.tmp", path)

    def image_grid(self, name: str, images: torch.Tensor, nrow: int | None = None,
                   step: int | None = None) -> str | None:
        """Save [-1, 1] images as `images/<name>.png`; returns the path (None off rank 0). With `step`, TensorBoard
        shows the grid too, as the image `preview` at that step."""
        if not self.is_main:
            return None
        from common.data import save_image_grid

        path = self.path("images", f"{name}.png")
        save_image_grid(images, path, nrow=nrow)
        if step is not None and self.tensorboard is not None:
            self.tensorboard.image("preview", path, step)
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


RECORD_POSITION = ("split", "step", "epoch")  # where a record was logged, not a curve


def curve_values(record: dict) -> dict[str, float]:
    """The numbers of a metrics record as curves named `<split>/<name>` (`train/loss`, `train/lr`, `val/usage`);
    the val split's own `val_` prefix is dropped (`val_loss` is `val/loss`)."""
    split = record["split"]
    return {f"{split}/{key.removeprefix(split + '_')}": value for key, value in record.items()
            if key not in RECORD_POSITION and isinstance(value, (int, float)) and not isinstance(value, bool)}

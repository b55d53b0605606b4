"""A run's curves and preview grids as TensorBoard event files, written with torch.utils.tensorboard.

`RunLog` (common/runlog.py) mirrors into this what it writes to metrics.jsonl and images/, so
`tensorboard --logdir results/` shows every run's curves under the names the plots use.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from PIL import Image

from common.errors import ConfigError


class TensorBoardLog:
    """Event files in `run_dir`. A resumed run passes the first step it logs again as `purge_step`: TensorBoard
    then hides what the interrupted run logged from there on, and the curves continue without a fold."""

    def __init__(self, run_dir: str, purge_step: int | None = None):
        try:  # imported here: a run with experiment.tensorboard false needs neither the package nor its start-up
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("experiment.tensorboard is on but the tensorboard package is missing: "
                              "pip install tensorboard, or pass experiment.tensorboard=false") from None
        self.writer = SummaryWriter(run_dir, purge_step=purge_step)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, png_path: str, step: int) -> None:
        """A grid already saved as a PNG, so that TensorBoard shows the very pixels of the run directory's file."""
        with Image.open(png_path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()

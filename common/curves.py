"""Training curves of runs, read from their metrics.jsonl and drawn into one PNG with matplotlib's Agg.

Curves are named as in TensorBoard (`train/loss`, `train/lr`, `train/grad_norm`, `val/usage`, ...,
see common/runlog.curve_values). The figure has one panel per curve, training curves first,
with every run that logs the curve overlaid in its own colour and named in the legend.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

from common.errors import DataError
from common.runlog import curve_values, read_metrics

Curve = tuple[list[int], list[float]]  # steps, values
PANELS_PER_ROW = 4


def run_curves(run_dir: str) -> dict[str, Curve]:
    """Every curve of one run by name, in the order they first appear."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{run_dir}: no metrics.jsonl here; give the run directory of a training run "
                        "(main_stage1.py, main_stage2.py or main_mar.py)")
    try:
        records = read_metrics(path)
    except ValueError as error:
        raise DataError(f"{path}: a line is not JSON ({error}); is this the metrics log of a training run?") from None
    curves: dict[str, Curve] = {}
    for record in records:
        if not isinstance(record, dict) or not {"split", "step"} <= record.keys():
            raise DataError(f"{path}: a record without 'split' and 'step'; is this the metrics log of a training run?")
        step = record["step"]
        for name, value in curve_values(record).items():
            steps, values = curves.setdefault(name, ([], []))
            while steps and steps[-1] >= step:  # a resumed run logs these steps again: its values replace them
                steps.pop()
                values.pop()
            steps.append(step)
            values.append(value)
    if not curves:
        raise DataError(f"{path} holds no curves yet; plot the run after its first logged step")
    return curves


def run_names(run_dirs: Sequence[str]) -> list[str]:
    """The folder names, or the paths as given where two runs share a folder name."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(d) for d in run_dirs]


def panel_order(names: set[str]) -> list[str]:
    """Training curves first, then evaluation and any other split; losses, then the rest, alphabetically."""
    def key(name: str) -> tuple:
        split, curve = name.split("/", 1)
        return split != "train", split, not curve.startswith("loss"), curve

    return sorted(names, key=key)


def plot_runs(run_dirs: Sequence[str], output_path: str) -> list[str]:
    """Draw every curve of the runs into the PNG `output_path`, the runs overlaid; returns the panel names."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    runs = {name: run_curves(run_dir) for name, run_dir in zip(run_names(run_dirs), run_dirs)}
    panels = panel_order({curve for curves in runs.values() for curve in curves})
    columns = min(PANELS_PER_ROW, len(panels))
    rows = math.ceil(len(panels) / columns)
    # Figure and canvas directly, not pyplot: no global backend or figure registry to disturb a caller's.
    width, height = 4 * columns, 3 * rows + 0.5
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    # Margins in inches: constrained layout would measure every tick label, twice, and take seconds.
    figure.subplots_adjust(left=0.8 / width, right=1 - 0.2 / width, bottom=0.5 / height, top=1 - 0.8 / height,
                           wspace=0.35, hspace=0.5)
    colours = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    for ax, panel in zip(axes, panels):
        for name, curves in runs.items():
            if panel in curves:
                steps, values = curves[panel]
                ax.plot(steps, values, color=colours[name], marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_title(panel, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    figure.legend(handles=[Line2D([], [], color=colours[name], label=name) for name in runs],
                  loc="upper center", ncol=min(len(runs), PANELS_PER_ROW))
    directory = os.path.dirname(output_path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(output_path, dpi=100)
    return panels

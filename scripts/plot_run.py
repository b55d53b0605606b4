"""Training curves of one or several runs in one PNG: losses, learning rate, grad norm, evaluation scores.

    python scripts/plot_run.py results/rqvae                                   # -> results/rqvae/curves.png
    python scripts/plot_run.py results/rqvae results/rqvae__lr2e-4 --output plots   # -> plots/curves.png

Reads each run directory's metrics.jsonl (any run of main_stage1.py, main_stage2.py, main_mar.py):
one panel per logged curve, the runs overlaid and named by their folders. Without --output the
PNG goes to the runs' common parent folder (the run directory itself for one run).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.curves import plot_runs  # noqa: E402
from common.errors import cli_entry  # noqa: E402

FILE_NAME = "curves.png"


@cli_entry
def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("--output", default=None, help=f"folder for {FILE_NAME} (default: the runs' common folder)")
    args = parser.parse_args(argv)
    output = args.output or os.path.commonpath([os.path.abspath(d) for d in args.run_dirs])
    path = os.path.join(output, FILE_NAME)
    panels = plot_runs(args.run_dirs, path)
    print(f"{path}: {len(panels)} curves of {len(args.run_dirs)} run(s)")
    return path


if __name__ == "__main__":
    main()

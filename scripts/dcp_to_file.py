"""Join a sharded checkpoint folder (`experiment.dcp: true`: last.dcp/, epochN_model.dcp/) into one checkpoint file.

    python scripts/dcp_to_file.py results/gpt-xxl/last.dcp results/gpt-xxl/last.pt

The file is one of our checkpoints like any a run writes without `experiment.dcp` (weights, EMA, optimizer,
position, RNG states), so the sampling and evaluation scripts take it; it needs the whole state in this host's
memory. One process, no launcher.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.dcp import is_dcp_folder, join_folder  # noqa: E402
from common.errors import CheckpointError, cli_entry  # noqa: E402
from common.paths import check_output_file  # noqa: E402


@cli_entry
def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a checkpoint folder written with experiment.dcp (*.dcp)")
    parser.add_argument("output", help="the checkpoint file to write (.pt)")
    args = parser.parse_args(argv)
    if not is_dcp_folder(args.folder):
        raise CheckpointError(f"{args.folder}: not a sharded checkpoint folder (no .metadata and meta.pt in it)")
    check_output_file(args.output, "output")
    join_folder(args.folder, args.output)
    print(f"wrote {args.output}")
    return args.output


if __name__ == "__main__":
    main()

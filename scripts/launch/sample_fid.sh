#!/usr/bin/env bash
# Sample N images from any prior and score them (FID, IS), every process a shard,
# under torchrun on one node or many.
# The variables (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, MAX_RESTARTS) are read by torchrun.sh.
#
#   scripts/launch/sample_fid.sh main_sampling_fid.py's flags and key=value overrides ...
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" main_sampling_fid.py "$@"

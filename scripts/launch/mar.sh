#!/usr/bin/env bash
# Train or evaluate MAR with the official flags, under torchrun on one node or many.
# The variables (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, MAX_RESTARTS) are read by torchrun.sh.
#
#   scripts/launch/mar.sh main_mar.py's flags and key=value overrides ...
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" main_mar.py "$@"

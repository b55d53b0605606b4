#!/usr/bin/env bash
# Train a tokenizer (RQ-VAE, Open-MAGVIT2, VQ-16, KL-VAE) from a config,
# under torchrun on one node or many.
# The variables (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, MAX_RESTARTS) are read by torchrun.sh.
#
#   scripts/launch/stage1.sh main_stage1.py's flags and key=value overrides ...
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" main_stage1.py "$@"

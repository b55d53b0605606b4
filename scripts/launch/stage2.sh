#!/usr/bin/env bash
# Train a prior (RQ-Transformer, LlamaGen GPT with next-patch prediction) on a tokenizer's codes,
# under torchrun on one node or many.
# The variables (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, MAX_RESTARTS) are read by torchrun.sh.
#
#   scripts/launch/stage2.sh main_stage2.py's flags and key=value overrides ...
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" main_stage2.py "$@"

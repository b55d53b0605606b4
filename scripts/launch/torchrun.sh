#!/usr/bin/env bash
# torchrun on one node or many, from the usual variables; stage1.sh, stage2.sh, mar.sh and sample_fid.sh call it.
#
#   NNODES          nodes in the job                          (default 1)
#   NODE_RANK       this node's place among them, 0 .. NNODES-1  (default 0)
#   MASTER_ADDR     the address of node 0                     (default 127.0.0.1)
#   MASTER_PORT     a free port on node 0                     (default 29500)
#   NPROC_PER_NODE  processes on this node                    (default: its GPUs, 1 without)
#   MAX_RESTARTS    restarts of the whole worker group after a crash or preemption; each training run then
#                   resumes by itself from its run directory's last checkpoint   (default 0)
#   RDZV_ID         with MAX_RESTARTS > 0: the job's name, the same on every node    (default argen)
#   TORCHRUN        the launcher command                      (default torchrun)
#
# With restarts the nodes meet through torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT (node ranks are then
# assigned as the nodes arrive): its static one, which NODE_RANK sets, keeps one store for every restart, and a
# restarted group can read the addresses of the group that died there.
#
# Usage: torchrun.sh SCRIPT [ARGS...]   SCRIPT relative to the repository root; ARGS go to it unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
script="$1"
shift
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1
fi
addr="${MASTER_ADDR:-127.0.0.1}"
port="${MASTER_PORT:-29500}"
if [[ "${MAX_RESTARTS:-0}" -gt 0 ]]; then
    meeting=(--rdzv-backend c10d --rdzv-endpoint "$addr:$port" --rdzv-id "${RDZV_ID:-argen}")
else
    meeting=(--node_rank "${NODE_RANK:-0}" --master_addr "$addr" --master_port "$port")
fi
# TORCHRUN unquoted: it may be a command with arguments (python -m torch.distributed.run)
exec ${TORCHRUN:-torchrun} --nnodes "${NNODES:-1}" "${meeting[@]}" \
    --nproc_per_node "$NPROC_PER_NODE" --max-restarts "${MAX_RESTARTS:-0}" \
    "$root/$script" "$@"

#!/usr/bin/env bash
# Several nodes: run this same command on every node (NODE_RANK 0 .. NNODES-1).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 launch/torchrun_multi_node.sh
# The c10d rendezvous runs on MASTER_ADDR:MASTER_PORT (node 0 hosts it); moecomm.distributed.init()
# then opens its own store at the same address (torchrun's agent store, TORCHELASTIC_USE_AGENT_STORE).
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR (node 0)}"
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
MASTER_PORT=${MASTER_PORT:-29500}
exec python -m torch.distributed.run \
  --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --nproc-per-node "${NPROC}" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id "${RDZV_ID:-moecomm}" \
  -m moecomm.apps.ep_demo "$@"

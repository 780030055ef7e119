#!/usr/bin/env bash
# One node, one rank per GPU (or NPROC CPU ranks over gloo when there is no GPU).
#   NPROC=4 launch/torchrun_single_node.sh --tokens-per-rank 512
# Extra arguments go to the per-rank program (python -m moecomm.apps.ep_demo --help).
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "${NPROC}" -gt 0 ]] || NPROC=2
fi
exec python -m torch.distributed.run --standalone --nproc-per-node "${NPROC}" -m moecomm.apps.ep_demo "$@"

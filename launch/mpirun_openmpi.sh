#!/usr/bin/env bash
# Open MPI: NP ranks, GPUS_PER_NODE per host, hosts from HOSTFILE (omit for one node).
#   NP=16 GPUS_PER_NODE=8 HOSTFILE=hosts.txt launch/mpirun_openmpi.sh
# moecomm.distributed.init() reads OMPI_COMM_WORLD_* through mpi4py, takes the local rank from a
# shared-memory split (OMPI_COMM_WORLD_LOCAL_RANK can be out of order), and rank 0 broadcasts
# the rendezvous address. --allow-run-as-root: containers run as root, and Open MPI exits at once
# as root without it (or OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1); --oversubscribe:
# more ranks than cores on a CPU test box. -x forwards the variables every rank needs.
# mpi4py must load this mpirun's libmpi: see launch/README.md, "mpi4py and the MPI library".
set -euo pipefail
NP=${NP:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-${NP}}
HOSTS=()
[[ -n "${HOSTFILE:-}" ]] && HOSTS=(--hostfile "${HOSTFILE}")
exec mpirun --allow-run-as-root --oversubscribe -np "${NP}" "${HOSTS[@]}" \
  --map-by "ppr:${GPUS_PER_NODE}:node" --bind-to none \
  -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH -x MOECOMM_TIMEOUT_S -x NCCL_DEBUG \
  python -m moecomm.apps.ep_demo "$@"

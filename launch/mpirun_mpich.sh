#!/usr/bin/env bash
# MPICH (Hydra; `pip install mpi4py mpich` gives one): NP ranks, PPN per host, hosts in HOSTS.
#   NP=4 launch/mpirun_mpich.sh                          # one node
#   NP=16 PPN=8 HOSTS=node0,node1 launch/mpirun_mpich.sh  # two nodes
# Hydra sets PMI_RANK/PMI_SIZE; moecomm.distributed.init() uses mpi4py for ranks and the local rank.
set -euo pipefail
NP=${NP:-2}
ARGS=(-n "${NP}")
[[ -n "${PPN:-}" ]] && ARGS+=(-ppn "${PPN}")
[[ -n "${HOSTS:-}" ]] && ARGS+=(-hosts "${HOSTS}")
exec mpiexec "${ARGS[@]}" -genvall python -m moecomm.apps.ep_demo "$@"

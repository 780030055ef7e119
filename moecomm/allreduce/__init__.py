"""All-reduce across the ranks of one node over symmetric IPC buffers (issue 13).

- ``CustomAllReduce(group, max_size=...)``: vLLM-like; one-shot for small inputs, two-shot
  (reduce-scatter + all-gather through the buffers) for medium ones, NCCL above max_size or when
  the group is not eligible (logged once); ``all_reduce_residual_rmsnorm`` fused; ``capture()``
  for CUDA graphs; ``check()`` raises AllReduceTimeoutError naming a peer that never arrived.
- ``VirtualAllReduce(world_size)``: the same kernels over W virtual ranks on one GPU (tests, benchmarks).
- ``reduce_sum``: the one-shot reduction step alone over given buffers (kernels/allreduce/reduce.cu).

Kernels: kernels/allreduce/{oneshot,twoshot,rmsnorm}.cu (sync.cuh: layout, flags, memory ordering,
bounded waits) through moecomm.jit.cuda; references in reference.py; thresholds in layout.py.
"""

from .api import reduce_sum
from .custom import CustomAllReduce
from .engine import AllReduceTimeoutError
from .layout import Algo
from .virtual import VirtualAllReduce

__all__ = ["Algo", "AllReduceTimeoutError", "CustomAllReduce", "VirtualAllReduce", "reduce_sum"]

"""All-reduce across the ranks of one node over peer (IPC) buffers (issue 13 builds it here).

Today: ``reduce_sum``, the reduction step of the one-shot all-reduce (every rank reads all peers'
buffers and sums them in rank order), a CUDA C++ kernel (kernels/allreduce/reduce.cu) compiled and
loaded through moecomm.jit.cuda, with its pure-torch reference.
"""

from .api import reduce_sum

__all__ = ["reduce_sum"]

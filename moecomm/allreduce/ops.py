"""CustomAllReduce's calls as custom ops, so that torch.compile(fullgraph=True) traces them.

# n = elements of x (per rank), rows x hidden for the fused op

    torch.ops.moecomm.ipc_all_reduce(x, handle) -> y                    # y [*shape], x's dtype
    torch.ops.moecomm.ipc_all_reduce_residual_rmsnorm(x, residual, weight, eps, handle) -> (out, new_residual)

``handle`` is the CustomAllReduce's int in REGISTRY (moecomm.jit.registry: an op schema carries no
Python object; vLLM finds its communicator by group name the same way). CustomAllReduce.all_reduce /
all_reduce_residual_rmsnorm check their arguments, then call these ops only while compiling; eager
calls run the same implementation directly (the dispatcher costs tens of microseconds of host time).

Why the fallback (torch.distributed.all_reduce: NCCL, or gloo on CPU) sits inside the opaque op and
is not a functional collective: the path (one-shot, two-shot, NCCL) is chosen per call by the
input's size, so one op node covers all three and the compiled graph runs exactly what eager runs,
bit for bit; a functional collective would need a second graph shape for the fallback and would
give the compiler a reordering freedom the IPC paths do not have anyway. The cost: the compiler
cannot overlap the NCCL call with other work (it could not overlap the IPC kernels either).

The ops are not differentiable (differentiable=False: a tensor requiring grad raises eagerly); the
outputs are fresh tensors, never views of the staging buffers.
"""

from __future__ import annotations

import torch

from ..jit.ops import define_op
from ..jit.registry import Registry

REGISTRY = Registry("CustomAllReduce")


def _all_reduce_impl(x: torch.Tensor, handle: int) -> torch.Tensor:
    ar = REGISTRY.get(handle, "moecomm::ipc_all_reduce")
    return ar._all_reduce_trusted(x, None)


def _rmsnorm_impl(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                  handle: int) -> tuple[torch.Tensor, torch.Tensor]:
    ar = REGISTRY.get(handle, "moecomm::ipc_all_reduce_residual_rmsnorm")
    return ar._rmsnorm_trusted(x, residual, weight, eps, None)


ipc_all_reduce = define_op(
    "ipc_all_reduce", _all_reduce_impl,
    fake=lambda x, handle: torch.empty_like(x, memory_format=torch.contiguous_format),
    differentiable=False,
)

ipc_all_reduce_residual_rmsnorm = define_op(
    "ipc_all_reduce_residual_rmsnorm", _rmsnorm_impl,
    fake=lambda x, residual, weight, eps, handle: (
        torch.empty_like(residual, memory_format=torch.contiguous_format),
        torch.empty_like(residual, memory_format=torch.contiguous_format)),
    differentiable=False,
)

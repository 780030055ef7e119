"""IPCDispatcher's dispatch and combine as an opaque custom op pair, for torch.compile(fullgraph=True).

# T = num_tokens, H = hidden, k = top_k, W = ep_size, C = capacity_per_peer, R = W * C rows,
# L = num_local_experts, N = R * k expanded rows (0 on a rank without experts)

    torch.ops.moecomm.ipc_ep_dispatch(x, topk_ids, topk_weights, handle)
        -> (tokens [R, H], expert_offsets [L + 1] int32, tokens_per_expert [L] int32,
            row_weights [N] fp32, gather_idx [N] int32, home [T, k] int32, slot_pos [R, k] int32)
    torch.ops.moecomm.ipc_ep_combine(expert_out [N, H], slot_pos, home, handle) -> y [T, H]

The low-latency path has no host sync and static shapes, so each direction is one node: dispatch =
dispatch_send + dispatch_finish, combine = combine_send + combine_finish, for ONE rank a process
(the phase order of virtual ranks, moecomm.ep.ipc.virtual, is a host-side schedule across W
dispatchers and stays eager). IPCDispatcher.dispatch / combine call these only while compiling
and build the DispatchResult and EPHandle from the outputs; eager calls skip the dispatcher.
``handle`` is the IPCDispatcher's int in REGISTRY. The outputs are fresh copies (eager results are
views of the symmetric buffer: see moecomm/ep/nccl/static_ops.py for why and what it costs). Not
differentiable.
"""

from __future__ import annotations

import torch

from ...jit.ops import define_op
from ...jit.registry import Registry
from ..nccl.static_ops import fresh, static_dispatch_fakes

REGISTRY = Registry("IPCDispatcher")

_DISPATCH = "moecomm::ipc_ep_dispatch"


def _dispatch_impl(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, handle: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor]:
    d = REGISTRY.get(handle, _DISPATCH).dispatch_unchecked(x, topk_ids, topk_weights)
    return fresh(d.tokens, d.expert_offsets, d.tokens_per_expert, d.row_weights, d.gather_idx, d.handle.home,
                 d.handle.slot_pos)


def _dispatch_fake(x, topk_ids, topk_weights, handle):
    disp = REGISTRY.get(handle, _DISPATCH)
    return static_dispatch_fakes(x, disp.ep_size * disp.capacity, disp.num_local_experts, disp.top_k, disp.hidden,
                                 disp.dtype)


def _combine_impl(expert_out: torch.Tensor, slot_pos: torch.Tensor, home: torch.Tensor, handle: int) -> torch.Tensor:
    return REGISTRY.get(handle, "moecomm::ipc_ep_combine")._combine_eager(expert_out, slot_pos, home)


ipc_ep_dispatch = define_op("ipc_ep_dispatch", _dispatch_impl, fake=_dispatch_fake, differentiable=False)
ipc_ep_combine = define_op(
    "ipc_ep_combine", _combine_impl,
    fake=lambda expert_out, slot_pos, home, handle: expert_out.new_empty((home.shape[0], expert_out.shape[1])),
    differentiable=False,
)

"""EPDispatcher's static-capacity mode as an opaque custom op pair, for torch.compile(fullgraph=True).

# T = num_tokens, H = hidden, k = top_k, W = ep_size, C = capacity_per_peer, R = W * C rows,
# L = num_local_experts, N = R * k expanded rows (0 on a rank without experts)

    torch.ops.moecomm.ep_static_dispatch(x, topk_ids, topk_weights, handle)
        -> (tokens [R, H], expert_offsets [L + 1] int32, tokens_per_expert [L] int32,
            row_weights [N] fp32, gather_idx [N] int32, home [T, k] int32, slot_pos [R, k] int32)
    torch.ops.moecomm.ep_static_combine(expert_out [N, H], slot_pos, home, handle) -> y [T, H]

Why opaque ops: the static mode makes no host sync and every shape is fixed by the constructor, so
the whole step (plan, pack, all_to_all_single, expansion) is one node whose fake needs only the
sizes; the exchange inside it is torch.distributed's (gloo, NCCL) or the copy of a group of one.
EPDispatcher.dispatch / combine call these only while compiling and build the DispatchResult and
EPHandle from the outputs outside the op; eager calls run the same code without the dispatcher.

``handle`` is the EPDispatcher's int in REGISTRY (an op schema carries no Python object).

The outputs are copies (contiguous, fresh): eager results are views of the dispatcher's buffers,
valid until its next dispatch, but a compiled graph assumes an op's outputs are its own and may
reuse or keep them. The copy costs R * H elements (decode: W 8, C 128, H 7168 bf16 = 14.7 MB, about
5 us at H200 bandwidth) plus small index tensors. Not differentiable: the static mode is for decode.
"""

from __future__ import annotations

import torch

from ...jit.ops import define_op
from ...jit.registry import Registry

REGISTRY = Registry("EPDispatcher")

_DISPATCH = "moecomm::ep_static_dispatch"


def fresh(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Contiguous copies (an op's outputs must not be views of persistent buffers, nor alias each other)."""
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in ts)


def _dispatch_impl(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, handle: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor]:
    d = REGISTRY.get(handle, _DISPATCH)._static_dispatch_eager(x, topk_ids, topk_weights)
    return fresh(d.tokens, d.expert_offsets, d.tokens_per_expert, d.row_weights, d.gather_idx, d.handle.home,
                 d.handle.slot_pos)


def static_dispatch_fakes(x: torch.Tensor, rows: int, num_local_experts: int, top_k: int, hidden: int,
                          dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The outputs of a static-shape dispatch op (this mode's and the IPC path's), empty: tokens
    [R, H] of ``dtype``, expert_offsets [L + 1], tokens_per_expert [L], row_weights [N] fp32,
    gather_idx [N], home [T, k], slot_pos [R, k] (int32), N = R * k (0 on a rank without experts)."""
    R, L, k = rows, num_local_experts, top_k
    N = R * k if L else 0
    i32 = dict(dtype=torch.int32, device=x.device)
    return (torch.empty((R, hidden), dtype=dtype, device=x.device), torch.empty(L + 1, **i32), torch.empty(L, **i32),
            torch.empty(N, dtype=torch.float32, device=x.device), torch.empty(N, **i32),
            torch.empty((x.shape[0], k), **i32), torch.empty((R, k), **i32))


def _dispatch_fake(x, topk_ids, topk_weights, handle):
    disp = REGISTRY.get(handle, _DISPATCH)
    return static_dispatch_fakes(x, disp._static_rows(), disp.num_local_experts, disp.top_k, disp.hidden, x.dtype)


def _combine_impl(expert_out: torch.Tensor, slot_pos: torch.Tensor, home: torch.Tensor, handle: int) -> torch.Tensor:
    return REGISTRY.get(handle, "moecomm::ep_static_combine")._static_combine_eager(expert_out, slot_pos, home)


ep_static_dispatch = define_op("ep_static_dispatch", _dispatch_impl, fake=_dispatch_fake, differentiable=False)
ep_static_combine = define_op(
    "ep_static_combine", _combine_impl,
    fake=lambda expert_out, slot_pos, home, handle: expert_out.new_empty((home.shape[0], expert_out.shape[1])),
    differentiable=False,
)

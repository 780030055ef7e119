"""What dispatch returns and what every dispatcher implements.

# T = num_tokens, H = hidden, k = top_k, R = rows received by this rank, L = num_local_experts

The MoE layer runs, on any EP size:

    d = dispatcher.dispatch(x, topk_ids, topk_weights)
    h = expert_mlp(d.tokens, w_gate_up, w_down, d.expert_offsets, gather_idx=d.gather_idx, row_scale=d.row_weights)
    y = dispatcher.combine(h, d.handle)

The routing weight is applied once, to each expert-output row (row_weights, in the down GEMM's
epilogue), so that combine is an unweighted sum and partial sums can be formed on the expert's rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class DispatchResult:
    """Tokens as the local experts see them.

    Attributes:
        tokens: [R, H] rows grouped by local expert; or, when ``gather_idx`` is set, the source
            tensor [T, H] whose rows ``gather_idx`` selects (the permute is fused into the GEMM).
        expert_offsets: [L + 1] int32 on the device: rows of local expert e are
            offsets[e]:offsets[e+1] of the (gathered) row list. In the NCCL path's static-capacity
            mode the list keeps its static size and the rows after offsets[L] are padding: pass
            validate=False to expert_mlp / grouped_mm (they compute the groups only), as the MoE
            layer does, and never read those rows.
        tokens_per_expert: [L] int32 on the device.
        row_weights: [R] float32, the routing weight of each row, or None (weights applied by combine).
        gather_idx: [R] int32 or None: row i of the expert input is tokens[gather_idx[i]].
        handle: what combine needs to bring rows back; opaque to the caller.
    """

    tokens: torch.Tensor
    expert_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor
    row_weights: torch.Tensor | None
    gather_idx: torch.Tensor | None
    handle: Any


class Dispatcher(Protocol):
    num_local_experts: int

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult: ...

    def combine(self, expert_out: torch.Tensor, handle: Any) -> torch.Tensor: ...

    # The trusted twins (no argument checks), for callers that built the arguments themselves (the
    # MoE forward: x checked once by the layer, ids and weights from route(), expert_out from expert_mlp).
    def dispatch_unchecked(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult: ...

    def combine_unchecked(self, expert_out: torch.Tensor, handle: Any) -> torch.Tensor: ...

"""The dispatcher of EP size 1: dispatch is a permute on this rank, combine an unweighted row sum.

# T = num_tokens, H = hidden, k = top_k, E = num_experts, M = T * k routed rows

It implements the Dispatcher protocol of moecomm.ep.types, so the MoE layer runs the same code on
one device as across ranks:

    d = LocalDispatcher(num_experts=8, top_k=2)
    r = d.dispatch(x, topk_ids, topk_weights)      # r.tokens is x itself; r.gather_idx selects rows
    h = expert_mlp(r.tokens, ..., r.expert_offsets, gather_idx=r.gather_idx, row_scale=r.row_weights)
    y = d.combine(h, r.handle)                    # [T, H]
"""

from __future__ import annotations

import torch

from ..errors import MoeCommTypeError, MoeCommValueError, as_tensor, check_positive_int, check_tensor
from ..permute.api import (PermuteIndices, check_id_values, permute_with_row_weights_unchecked, unpermute,
                           unpermute_unchecked)
from .types import DispatchResult


class LocalDispatcher:
    """Dispatch/combine for expert parallelism of size 1 (every expert on this device).

    Args:
        num_experts: E, experts of the layer (all local).
        top_k: k, experts per token.
        materialize: False (default): dispatch returns x itself with gather_idx = src_token [M]
            (the GEMM gathers rows, no copy of the tokens). True: dispatch copies the rows into
            expert order ([M, H]) and gather_idx is None, for GEMMs that cannot gather.
        validate: check topk_ids against [0, E) on the device data (one host read per dispatch,
            skipped under CUDA-graph capture and compilation).
        materialize_min_rows: also materialize when a dispatch routes at least this many rows
            (T * k); None: only as ``materialize`` says. A GEMM reads contiguous rows through TMA,
            faster than the row gather at prefill sizes; the copy costs one pass over the rows.
    """

    def __init__(self, num_experts: int, top_k: int, *, materialize: bool = False, validate: bool = True,
                 materialize_min_rows: int | None = None):
        op = "LocalDispatcher"
        self.num_experts = check_positive_int(op, "num_experts", num_experts)
        self.top_k = check_positive_int(op, "top_k", top_k)
        if top_k > num_experts:
            raise MoeCommValueError(f"{op}: top_k must be <= num_experts={num_experts}, got {top_k}")
        if not isinstance(materialize, bool):
            raise MoeCommTypeError(f"{op}: materialize must be a bool, got {type(materialize).__name__}")
        self.num_local_experts = self.num_experts
        self.materialize = materialize
        self.validate = validate
        if materialize_min_rows is not None:
            check_positive_int(op, "materialize_min_rows", materialize_min_rows)
        self.materialize_min_rows = materialize_min_rows

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        """Group the routed rows by expert.

        Args:
            x: [T, H] float16, bfloat16 or float32: the tokens.
            topk_ids: [T, k] int32 or int64: experts of each token.
            topk_weights: [T, k] float32: routing weights; returned per row as row_weights [M].

        Returns:
            DispatchResult: tokens (x itself, or [M, H] rows in expert order when materialize),
            expert_offsets [E + 1] int32, tokens_per_expert [E] int32, row_weights [M] float32
            (weight of each permuted row), gather_idx [M] int32 (or None when materialize),
            handle (the PermuteIndices that combine needs).
        """
        op = "LocalDispatcher.dispatch"
        x = check_tensor(op, "x", x, ndim=2, dtype=(torch.float16, torch.bfloat16, torch.float32))
        topk_ids = check_tensor(op, "topk_ids", topk_ids, shape=[x.shape[0], self.top_k], dtype=(torch.int32, torch.int64),
                                device=x.device)
        topk_weights = check_tensor(
            op, "topk_weights", topk_weights, shape=[x.shape[0], self.top_k], dtype=torch.float32, device=x.device
        )
        topk_ids = check_id_values(op, topk_ids, self.num_experts, self.validate)  # checked once: then the trusted call
        return self.dispatch_unchecked(x, topk_ids, topk_weights)

    def dispatch_unchecked(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        """dispatch without any check (nor the device check of the ids), for the MoE forward: x [T, H]
        checked once by the layer, topk_ids [T, k] int32 (contiguous, in range) and topk_weights [T, k]
        float32 from route(). Gradients flow to x and topk_weights."""
        # Row r of expert order came from slot dst_row^-1(r): the sort writes that slot's weight to
        # row r itself (one launch for everything at decode sizes, no separate cast + scatter).
        res = permute_with_row_weights_unchecked(x, topk_ids, topk_weights, self.num_experts, self._materialize(x))
        return self._result(x, res)

    def _materialize(self, x: torch.Tensor) -> bool:
        rows = x.shape[0] * self.top_k
        return self.materialize or (self.materialize_min_rows is not None and rows >= self.materialize_min_rows)

    def _result(self, x: torch.Tensor, res) -> DispatchResult:
        materialize = res.permuted is not None
        idx = res.indices
        tokens, gather_idx = (res.permuted, None) if materialize else (x, idx.src_token)
        return DispatchResult(
            tokens=tokens,
            expert_offsets=idx.expert_offsets,
            tokens_per_expert=idx.tokens_per_expert,
            row_weights=res.row_weights,
            gather_idx=gather_idx,
            handle=idx,
        )

    def combine(self, expert_out: torch.Tensor, handle: PermuteIndices) -> torch.Tensor:
        """y [T, H] = sum over each token's k rows of expert_out [M, H] (weights were applied to rows).

        Args:
            expert_out: [M, H] float16, bfloat16 or float32, rows in the order dispatch produced.
            handle: DispatchResult.handle of the matching dispatch.
        """
        return unpermute(as_tensor("LocalDispatcher.combine", "expert_out", expert_out), handle, None)

    def combine_unchecked(self, expert_out: torch.Tensor, handle: PermuteIndices) -> torch.Tensor:
        """combine without any check, for the MoE forward (expert_out [M, H] from its expert_mlp)."""
        return unpermute_unchecked(expert_out, handle, None)

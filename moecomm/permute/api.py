"""Permute and unpermute on one rank: group routed token rows by expert, and sum them back.

# T = num_tokens, H = hidden, k = top_k, E = num_experts, M = T * k routed rows

    idx = permute_indices(topk_ids, num_experts)          # where every (token, slot) goes
    p = permute(x, topk_ids, num_experts)                 # p.permuted [M, H] grouped by expert
    h = experts(p.permuted, p.indices.expert_offsets)     # any per-expert computation, [M, H']
    y = unpermute(h, p.indices, topk_weights)             # [T, H'] = sum_j w[t, j] * h[dst_row[t, j]]

Every output has a static shape (M = T * k), counts and offsets stay on the device: nothing here
waits for the GPU, so the ops work under CUDA-graph capture and torch.compile(fullgraph=True)
(they are torch.library custom ops with fake implementations and autograd formulas: x, topk_weights
and expert_out get gradients). The only device->host read is the optional range check of topk_ids
(validate=True, skipped while capturing or compiling).

Each public function checks its arguments, then calls the custom op; the op picks the Triton
kernel (GPU, or the interpreter on CPU with MOECOMM_BACKEND=triton) or the pure-torch reference.
Each has a trusted twin, <name>_unchecked, for internal callers that built or checked the
arguments themselves (the MoE forward's dispatch and combine): no checks, the same op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..jit.backend import Impl, choose, device_checks_allowed
from ..jit.ops import define_op
from ..errors import MoeCommTypeError, MoeCommValueError, check_positive_int, check_tensor
from . import reference

_ID_DTYPES = (torch.int32, torch.int64)
_ROW_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1


@dataclass
class PermuteIndices:
    """Where every routed (token, slot) goes; the handle that unpermute needs. All int32, on the device.

    Attributes:
        src_token: [M] int32: permuted row i holds token src_token[i].
        dst_row: [T, k] int32: slot (t, j) was written to permuted row dst_row[t, j].
        tokens_per_expert: [E] int32: rows routed to each expert.
        expert_offsets: [E + 1] int32: expert e owns rows expert_offsets[e]:expert_offsets[e + 1].
            Rows are grouped by expert, and inside an expert ordered by (token, slot) ascending.
            expert_offsets[E] == M unless unvalidated ids outside [0, E) were dropped to the end.
    """

    src_token: torch.Tensor
    dst_row: torch.Tensor
    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor

    @property
    def num_experts(self) -> int:
        """E, the number of experts these indices were computed for."""
        return self.tokens_per_expert.shape[0]


@dataclass
class PermuteResult:
    """What permute returns.

    Attributes:
        permuted: [M, H] the token rows grouped by expert, dtype of x.
        indices: the PermuteIndices of this permutation (pass it to unpermute).
    """

    permuted: torch.Tensor
    indices: PermuteIndices


# ---------------------------------------------------------------------------------------------
# custom ops (moecomm/jit/ops.py define_op): the implementation choice lives inside them, so
# torch.compile sees one opaque node; each differentiable one carries its autograd formula.
#
# Gradients. permuted[i] = x[src_token[i]] and row_weights[dst_row[t, j]] = topk_weights[t, j], so
# d x = unpermute(d permuted) (each token sums its k rows) and d topk_weights = d row_weights[dst_row];
# y[t] = sum_j w[t, j] * expert_out[dst_row[t, j]], so d expert_out[dst_row[t, j]] = w[t, j] * d y[t]
# (dst_row is a bijection onto the M rows: one index_copy) and d w[t, j] = <d y[t], expert_out[dst_row[t, j]]>.


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sort(topk_ids: torch.Tensor, num_experts: int, x: torch.Tensor | None, out: torch.Tensor | None,
          topk_weights: torch.Tensor | None):
    """The counting sort (+ the row copy into ``out`` when x is given, + row weights when given)."""
    if choose(topk_ids, "permute") is Impl.TRITON:
        from ._triton import permute_triton

        res = permute_triton(topk_ids, num_experts, x, out, topk_weights)
        return res if topk_weights is not None else res[:4]
    src_token, dst_row, tpe, offsets = reference.permute_indices_ref(topk_ids, num_experts)
    if x is not None:
        torch.index_select(x, 0, src_token.long(), out=out)
    if topk_weights is None:
        return src_token, dst_row, tpe, offsets
    row_weights = topk_weights.new_empty(src_token.shape[0])
    row_weights.scatter_(0, dst_row.reshape(-1).long(), topk_weights.reshape(-1))
    return src_token, dst_row, tpe, offsets, row_weights


def _index_fakes(topk_ids: torch.Tensor, num_experts: int):
    t, k = topk_ids.shape
    new = topk_ids.new_empty
    return (
        new(t * k, dtype=torch.int32),
        new(t, k, dtype=torch.int32),
        new(num_experts, dtype=torch.int32),
        new(num_experts + 1, dtype=torch.int32),
    )


def _rows_fake(x: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    return x.new_empty(topk_ids.numel(), x.shape[1])


def _permute_indices_impl(
    topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _sort(topk_ids, num_experts, None, None, None)


permute_indices_op = define_op("permute_indices", _permute_indices_impl, fake=_index_fakes, differentiable=False)


def _permute_impl(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out = x.new_empty(topk_ids.numel(), x.shape[1])
    return (out, *_sort(topk_ids, num_experts, x, out, None))


def _save_dst_row(ctx, inputs, output, at: int) -> None:
    ctx.save_for_backward(output[at])


def _rows_grad(grad_permuted: torch.Tensor, dst_row: torch.Tensor) -> torch.Tensor:
    """d x [T, H] from d permuted [M, H]: each token sums its k rows (the unpermute op, unweighted)."""
    return torch.ops.moecomm.unpermute(grad_permuted.contiguous(), dst_row, None)


def _permute_backward(ctx, grad_permuted, *_index_grads):
    (dst_row,) = ctx.saved_tensors
    return _rows_grad(grad_permuted, dst_row), None, None


permute_op = define_op(
    "permute", _permute_impl, fake=lambda x, topk_ids, num_experts: (_rows_fake(x, topk_ids), *_index_fakes(topk_ids, num_experts)),
    setup_context=lambda ctx, inputs, output: _save_dst_row(ctx, inputs, output, 2), backward=_permute_backward)


# out= variant: the caller owns the output buffer (allocated once, e.g. for CUDA graphs). It mutates
# its argument, so it records no gradient (the Op raises if x requires grad: use out=None to train).
def _permute_out_impl(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _sort(topk_ids, num_experts, x, out, None)


permute_out_op = define_op("permute_out", _permute_out_impl, fake=lambda x, topk_ids, num_experts, out: _index_fakes(topk_ids, num_experts),
                           mutates_args=("out",), differentiable=False)


# Internal: the permute plus each permuted row's routing weight, row_weights[dst_row[t, j]] =
# topk_weights[t, j], written by the sort's own kernel (no extra cast + scatter launches).
# LocalDispatcher.dispatch is its caller; the public permute/permute_indices stay as they are.


def _permute_indices_weighted_impl(
    topk_ids: torch.Tensor, num_experts: int, topk_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _sort(topk_ids, num_experts, None, None, topk_weights)


def _weights_grad(grad_row_weights: torch.Tensor, dst_row: torch.Tensor) -> torch.Tensor:
    """d topk_weights [T, k] = d row_weights [M] read at dst_row."""
    return grad_row_weights[dst_row.long()]


def _permute_indices_weighted_backward(ctx, _g_src, _g_dst, _g_tpe, _g_off, grad_row_weights):
    (dst_row,) = ctx.saved_tensors
    return None, None, _weights_grad(grad_row_weights, dst_row)


permute_indices_weighted_op = define_op(
    "permute_indices_weighted", _permute_indices_weighted_impl,
    fake=lambda topk_ids, num_experts, topk_weights: (*_index_fakes(topk_ids, num_experts), topk_weights.new_empty(topk_ids.numel())),
    setup_context=lambda ctx, inputs, output: _save_dst_row(ctx, inputs, output, 1),
    backward=_permute_indices_weighted_backward)


def _permute_weighted_impl(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, topk_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out = x.new_empty(topk_ids.numel(), x.shape[1])
    return (out, *_sort(topk_ids, num_experts, x, out, topk_weights))


def _permute_weighted_backward(ctx, grad_permuted, _g_src, _g_dst, _g_tpe, _g_off, grad_row_weights):
    (dst_row,) = ctx.saved_tensors
    gx = _rows_grad(grad_permuted, dst_row) if ctx.needs_input_grad[0] else None
    gw = _weights_grad(grad_row_weights, dst_row) if ctx.needs_input_grad[3] else None
    return gx, None, None, gw


permute_weighted_op = define_op(
    "permute_weighted", _permute_weighted_impl,
    fake=lambda x, topk_ids, num_experts, topk_weights: (_rows_fake(x, topk_ids), *_index_fakes(topk_ids, num_experts),
                                                         topk_weights.new_empty(topk_ids.numel())),
    setup_context=lambda ctx, inputs, output: _save_dst_row(ctx, inputs, output, 2),
    backward=_permute_weighted_backward)


def _combine_into(expert_out: torch.Tensor, dst_row: torch.Tensor, topk_weights: torch.Tensor | None, out: torch.Tensor) -> None:
    if choose(expert_out, "combine") is Impl.TRITON:
        from ._triton import combine_triton

        combine_triton(expert_out, dst_row, topk_weights, out)
        return
    out.copy_(reference.combine_ref(expert_out, dst_row, topk_weights))


def _unpermute_impl(expert_out: torch.Tensor, dst_row: torch.Tensor, topk_weights: torch.Tensor | None) -> torch.Tensor:
    out = expert_out.new_empty(dst_row.shape[0], expert_out.shape[1])
    _combine_into(expert_out, dst_row, topk_weights, out)
    return out


def _unpermute_setup(ctx, inputs, output) -> None:
    expert_out, dst_row, topk_weights = inputs
    ctx.save_for_backward(expert_out, dst_row, topk_weights)


def _unpermute_backward(ctx, grad_y):
    expert_out, dst_row, topk_weights = ctx.saved_tensors
    num_tokens, top_k = dst_row.shape
    hidden = expert_out.shape[1]
    acc = _acc(expert_out.dtype)
    rows = dst_row.reshape(-1).long()  # [M], a bijection onto the rows of expert_out
    g = grad_y.to(acc)  # [T, H]
    g_out = g_w = None
    if ctx.needs_input_grad[0]:
        per_slot = g[:, None, :] if topk_weights is None else g[:, None, :] * topk_weights.to(acc)[:, :, None]
        per_slot = per_slot.expand(num_tokens, top_k, hidden).reshape(num_tokens * top_k, hidden)  # [M, H]
        g_out = expert_out.new_empty(expert_out.shape).index_copy_(0, rows, per_slot.to(expert_out.dtype))
    if topk_weights is not None and ctx.needs_input_grad[2]:
        picked = expert_out.index_select(0, rows).view(num_tokens, top_k, hidden).to(acc)  # [T, k, H]
        g_w = torch.bmm(picked, g.unsqueeze(-1)).squeeze(-1).to(topk_weights.dtype)  # [T, k]
    return g_out, None, g_w


unpermute_op = define_op(
    "unpermute", _unpermute_impl, fake=lambda expert_out, dst_row, topk_weights: expert_out.new_empty(dst_row.shape[0], expert_out.shape[1]),
    setup_context=_unpermute_setup, backward=_unpermute_backward)


def _unpermute_out_impl(expert_out: torch.Tensor, dst_row: torch.Tensor, topk_weights: torch.Tensor | None, out: torch.Tensor) -> None:
    _combine_into(expert_out, dst_row, topk_weights, out)


unpermute_out_op = define_op("unpermute_out", _unpermute_out_impl, fake=lambda expert_out, dst_row, topk_weights, out: None,
                             mutates_args=("out",), differentiable=False)


# ---------------------------------------------------------------------------------------------
# validation


def _check_topk_ids(op: str, topk_ids: Any, num_experts: Any, validate: bool) -> tuple[torch.Tensor, int]:
    num_experts = check_positive_int(op, "num_experts", num_experts)
    topk_ids = check_tensor(op, "topk_ids", topk_ids, ndim=2, dtype=_ID_DTYPES)
    num_tokens, top_k = topk_ids.shape
    if top_k < 1 or top_k > num_experts:
        raise MoeCommValueError(
            f"{op}: topk_ids must have 1 to num_experts={num_experts} columns (top_k), got shape {list(topk_ids.shape)}"
        )
    return check_id_values(op, topk_ids, num_experts, validate), num_experts


def check_id_values(op: str, topk_ids: torch.Tensor, num_experts: int, validate: bool) -> torch.Tensor:
    """The checks of topk_ids [T, k] (int32/int64, 1 <= k <= E already checked) that need its size or
    its values: T * k fits int32 row indices; with validate, ids in [0, E) (one device->host read,
    skipped under capture and compile). Returns topk_ids contiguous. For callers that checked the
    rest themselves (LocalDispatcher.dispatch), so a public call validates once."""
    num_tokens, top_k = topk_ids.shape
    if num_tokens * top_k > _INT32_MAX:
        raise MoeCommValueError(f"{op}: topk_ids must have at most 2**31 - 1 elements (int32 row indices), got {num_tokens * top_k}")
    if topk_ids.numel() > 0 and device_checks_allowed(validate):
        bad = (topk_ids < 0) | (topk_ids >= num_experts)
        if bool(bad.any()):  # one device->host read; validate=False skips it
            first = topk_ids[bad][0].item()
            raise MoeCommValueError(f"{op}: topk_ids must be in [0, num_experts={num_experts}), got {first}")
    return topk_ids.contiguous()


def _unit_inner_stride(t: torch.Tensor) -> torch.Tensor:
    # Kernels take a row stride but need contiguous rows for 16-byte vector access.
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _check_out(op: str, out: Any, shape: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = check_tensor(op, "out", out, shape=shape, dtype=dtype, device=device)
    if out.shape[1] > 1 and out.stride(1) != 1:
        raise MoeCommValueError(f"{op}: out must have contiguous rows (stride(1) == 1), got strides {list(out.stride())}")
    return out


# ---------------------------------------------------------------------------------------------
# public API


def _check_rows_and_ids(op: str, x: Any, topk_ids: Any, num_experts: int, validate: bool):
    """x [T, H] of a row dtype, topk_ids [T, k] on its device, ids checked as permute_indices does."""
    x = check_tensor(op, "x", x, ndim=2, dtype=_ROW_DTYPES)
    topk_ids = check_tensor(op, "topk_ids", topk_ids, ndim=2, dtype=_ID_DTYPES, device=x.device)
    if topk_ids.shape[0] != x.shape[0]:
        raise MoeCommValueError(f"{op}: topk_ids must have shape [{x.shape[0]}, top_k] (one row per token of x), got {list(topk_ids.shape)}")
    topk_ids, num_experts = _check_topk_ids(op, topk_ids, num_experts, validate)
    return x, topk_ids, num_experts


def permute_indices(topk_ids: Any, num_experts: int, *, validate: bool = True) -> PermuteIndices:
    """Where each routed (token, slot) goes when rows are grouped by expert; no rows are moved.

    A stable counting sort on the device (no host sync): rows grouped by expert, inside an expert
    by (token, slot) ascending, so the result is deterministic.

    Args:
        topk_ids: [T, k] int32 or int64: expert of each token's k slots, in [0, num_experts).
            A torch tensor or any DLPack array (wrapped without a copy).
        num_experts: E, the number of experts.
        validate: check on the device data that ids are in range (one device->host read). Skipped
            under CUDA-graph capture and compilation. Unvalidated ids out of range are never used as
            addresses: their slots go to rows after expert_offsets[E] that no expert owns.

    Returns:
        PermuteIndices (src_token [M], dst_row [T, k], tokens_per_expert [E], expert_offsets [E+1]).

    Example:
        >>> idx = permute_indices(torch.tensor([[1, 0], [1, 2]]), 3)
        >>> idx.src_token.tolist(), idx.expert_offsets.tolist()
        ([0, 0, 1, 1], [0, 1, 3, 4])
    """
    topk_ids, num_experts = _check_topk_ids("permute_indices", topk_ids, num_experts, validate)
    return permute_indices_unchecked(topk_ids, num_experts)


def permute_indices_unchecked(topk_ids: torch.Tensor, num_experts: int) -> PermuteIndices:
    """permute_indices without any check: for callers whose topk_ids [T, k] int32/int64 are contiguous
    and in range by construction (ids from route())."""
    return PermuteIndices(*permute_indices_op(topk_ids, num_experts))


def permute(
    x: Any, topk_ids: Any, num_experts: int, *, out: Any = None, validate: bool = True
) -> PermuteResult:
    """Copy token rows into expert order: permuted[i] = x[src_token[i]].

    Args:
        x: [T, H] float16, bfloat16 or float32: the tokens. Any row stride (non-contiguous rows
            are read in place).
        topk_ids: [T, k] int32 or int64 on x's device: each token's experts, in [0, num_experts).
        num_experts: E.
        out: optional [M, H] tensor of x's dtype with contiguous rows, written in place (a
            caller-owned buffer, e.g. for CUDA graphs); a new tensor otherwise.
        validate: as in permute_indices.

    Returns:
        PermuteResult(permuted [M, H], indices: PermuteIndices).

    Example:
        >>> p = permute(torch.randn(4, 8), torch.tensor([[0, 1]] * 4), num_experts=2)
        >>> p.permuted.shape, p.indices.tokens_per_expert.tolist()
        (torch.Size([8, 8]), [4, 4])
    """
    op = "permute"
    x, topk_ids, num_experts = _check_rows_and_ids(op, x, topk_ids, num_experts, validate)
    if out is not None:
        out = _check_out(op, out, [topk_ids.numel(), x.shape[1]], x.dtype, x.device)
    return permute_unchecked(x, topk_ids, num_experts, out)


def permute_unchecked(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                      out: torch.Tensor | None = None) -> PermuteResult:
    """permute without any check (arguments as permute's, already checked or built by the caller).
    Records gradients for x unless ``out`` is given."""
    x = _unit_inner_stride(x)
    if out is None:
        permuted, *idx = permute_op(x, topk_ids, num_experts)
    else:
        permuted, idx = out, permute_out_op(x, topk_ids, num_experts, out)
    return PermuteResult(permuted, PermuteIndices(*idx))


@dataclass
class WeightedPermute:
    """What permute_with_row_weights returns (internal: the dispatch of LocalDispatcher).

    Attributes:
        indices: the PermuteIndices of the permutation.
        permuted: [M, H] rows of x in expert order, or None when rows were not materialized.
        row_weights: [M] float32: row_weights[dst_row[t, j]] = topk_weights[t, j].
    """

    indices: PermuteIndices
    permuted: torch.Tensor | None
    row_weights: torch.Tensor


def permute_with_row_weights(
    x: Any, topk_ids: Any, topk_weights: Any, num_experts: int, *, materialize: bool, validate: bool = True
) -> WeightedPermute:
    """permute (materialize=True) or permute_indices (False), plus the routing weight of every row.

    The dispatch of LocalDispatcher (which checks its arguments itself and calls the trusted twin,
    permute_with_row_weights_unchecked): one launch on the GPU at decode sizes (M <= SMALL_M
    of moecomm.ep._triton, plus the row copy when materialize), and at every size the weights ride
    in the sort's scatter kernel instead of a cast and a scatter of their own.

    Args:
        x: [T, H] float16, bfloat16 or float32: the tokens (only read when materialize).
        topk_ids: [T, k] int32 or int64 on x's device, in [0, num_experts).
        topk_weights: [T, k] float32 on x's device: routing weights (any strides).
        num_experts: E.
        materialize: copy the rows into expert order ([M, H]); else only the indices.
        validate: as in permute_indices.

    Returns:
        WeightedPermute(indices, permuted [M, H] or None, row_weights [M] float32).
    """
    op = "permute_with_row_weights"
    x, topk_ids, num_experts = _check_rows_and_ids(op, x, topk_ids, num_experts, validate)
    topk_weights = check_tensor(op, "topk_weights", topk_weights, shape=list(topk_ids.shape), dtype=torch.float32, device=x.device)
    return permute_with_row_weights_unchecked(x, topk_ids, topk_weights, num_experts, materialize)


def permute_with_row_weights_unchecked(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                                       num_experts: int, materialize: bool) -> WeightedPermute:
    """permute_with_row_weights without any check: the MoE forward's dispatch (x [T, H] checked by the
    layer, topk_ids [T, k] int32 contiguous and in range and topk_weights [T, k] float32 from route()).
    Records gradients for x (when materialize) and topk_weights."""
    if materialize:
        permuted, *idx, row_weights = permute_weighted_op(_unit_inner_stride(x), topk_ids, num_experts, topk_weights)
    else:
        permuted = None
        *idx, row_weights = permute_indices_weighted_op(topk_ids, num_experts, topk_weights)
    return WeightedPermute(PermuteIndices(*idx), permuted, row_weights)


def unpermute(expert_out: Any, indices: PermuteIndices, topk_weights: Any = None, *, out: Any = None) -> torch.Tensor:
    """Sum every token's k expert-output rows back into its slot: y[t] = sum_j w[t, j] * expert_out[dst_row[t, j]].

    Accumulated in fp32 in slot order j = 0..k-1 and each output row written once (no atomics):
    deterministic run to run.

    Args:
        expert_out: [M, H] float16, bfloat16 or float32: one row per permuted row, in the order
            permute produced (M = T * k).
        indices: the PermuteIndices returned by permute / permute_indices.
        topk_weights: [T, k] float32 routing weights, or None for an unweighted sum (weights
            already applied to the rows).
        out: optional [T, H] tensor of expert_out's dtype with contiguous rows, written in place.

    Returns:
        y: [T, H] of expert_out's dtype.
    """
    op = "unpermute"
    if not isinstance(indices, PermuteIndices):
        raise MoeCommTypeError(f"{op}: indices must be a PermuteIndices (from permute or permute_indices), got {type(indices).__name__}")
    dst_row = check_tensor(op, "indices.dst_row", indices.dst_row, ndim=2, dtype=torch.int32)
    num_tokens, top_k = dst_row.shape
    expert_out = check_tensor(op, "expert_out", expert_out, ndim=2, dtype=_ROW_DTYPES, device=dst_row.device)
    if expert_out.shape[0] != num_tokens * top_k:
        raise MoeCommValueError(
            f"{op}: expert_out must have T * k = {num_tokens * top_k} rows (one per permuted row), got shape {list(expert_out.shape)}"
        )
    if topk_weights is not None:
        topk_weights = check_tensor(
            op, "topk_weights", topk_weights, shape=[num_tokens, top_k], dtype=torch.float32, device=dst_row.device
        )
    if out is not None:
        out = _check_out(op, out, [num_tokens, expert_out.shape[1]], expert_out.dtype, expert_out.device)
    return _unpermute(expert_out, dst_row.contiguous(), topk_weights, out)


def unpermute_unchecked(expert_out: torch.Tensor, indices: PermuteIndices, topk_weights: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """unpermute without any check: the MoE forward's combine (expert_out [M, H] from expert_mlp, the
    indices of its own dispatch). Records gradients for expert_out and topk_weights unless ``out`` is given."""
    return _unpermute(expert_out, indices.dst_row, topk_weights, out)


def _unpermute(expert_out: torch.Tensor, dst_row: torch.Tensor, topk_weights: torch.Tensor | None,
               out: torch.Tensor | None) -> torch.Tensor:
    expert_out = _unit_inner_stride(expert_out)
    if out is None:
        return unpermute_op(expert_out, dst_row, topk_weights)
    unpermute_out_op(expert_out, dst_row, topk_weights, out)
    return out

"""merge_state / merge_state_in_place / merge_states: combine partial attention results by LSE.

# n = rows (tokens), S = num_states, H = heads, D = head_dim

Attention over KV = A + B is the LSE-weighted mean of the attention over A and over B:
  s = log2(2^s_a + 2^s_b),  v = 2^(s_a - s) v_a + 2^(s_b - s) v_b
(LSEs in base 2, as every wrapper here returns them, as FlashInfer's). Shared prefixes and cascades
run attention per level and merge. A state with s = -inf (no keys) weighs 0; all -inf gives v = 0.
"""

from __future__ import annotations

import torch

from ..errors import MoeCommValueError, check_tensor
from ..jit import backend as _backend
from ..jit.launch import launch, next_pow2
from ..jit.ops import define_op
from . import reference
from ._common import KV_DTYPES

_F32 = torch.float32


def _merge_impl(v: torch.Tensor, s: torch.Tensor, out: torch.Tensor, out_s: torch.Tensor,
                mask: torch.Tensor | None) -> None:
    """v [n, S, H, D] and s [n, S, H] as strided views (the two-state merge stacks nothing: it passes
    a strided view over two tensors only when they share storage; else see merge_state)."""
    if _backend.choose(v, "merge_states") is not _backend.Impl.TRITON:
        o, so = reference.merge_states(v, s)
        if mask is None:
            out.copy_(o)
            out_s.copy_(so)
        else:
            keep = mask.bool()
            out[keep] = o[keep].to(out.dtype)
            out_s[keep] = so[keep]
        return
    from . import _triton_misc as kern

    n, num_states, heads, dim = v.shape
    if n == 0 or heads == 0:
        return
    launch(kern.merge_states_kernel, (n, heads), (
        v, s, out, out_s, mask if mask is not None else s,
        num_states, v.stride(0), v.stride(1), v.stride(2), s.stride(0), s.stride(1), s.stride(2),
        out.stride(0), out.stride(1), out_s.stride(0), out_s.stride(1),
    ), dict(HEAD_DIM=dim, BLOCK_D=next_pow2(dim), HAS_MASK=mask is not None), 4 if dim >= 256 else 1)


_merge_op = define_op("attention_merge_states", _merge_impl, fake=lambda *args: None, mutates_args=("out", "out_s"),
                      differentiable=False)


def _check_pair(op, v, s, n=None, heads=None, dim=None, dtype=None, device=None, names=("v", "s")):
    v = check_tensor(op, names[0], v, dtype=dtype or KV_DTYPES, shape=(n, heads, dim), device=device)
    s = check_tensor(op, names[1], s, dtype=_F32, shape=(v.shape[0], v.shape[1]), device=v.device)
    if v.stride(-1) != 1:
        v = v.contiguous()
    return v, s


def merge_states(v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partial states per row and head.

    Args:
        v: [n, S, H, D] fp16/bf16/fp32, the partial outputs. s: [n, S, H] float32, their base-2 LSEs.
    Returns:
        (v [n, H, D] in v's dtype, s [n, H] float32).
    """
    v = check_tensor("merge_states", "v", v, dtype=KV_DTYPES, ndim=4)
    s = check_tensor("merge_states", "s", s, dtype=_F32, shape=tuple(v.shape[:3]), device=v.device)
    if v.stride(-1) != 1:
        v = v.contiguous()
    out = torch.empty((v.shape[0], v.shape[2], v.shape[3]), dtype=v.dtype, device=v.device)
    out_s = torch.empty((v.shape[0], v.shape[2]), dtype=_F32, device=v.device)
    _merge_op(v, s, out, out_s, None)
    return out, out_s


def _two_states(v_a, s_a, v_b, s_b):
    """v [n, 2, H, D], s [n, 2, H]: a stack (one copy of each state; cheap beside attention)."""
    return torch.stack((v_a, v_b), dim=1), torch.stack((s_a, s_b), dim=1)


def merge_state(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor):
    """Merge two states: attention over segments A and B -> attention over A + B.

    Args:
        v_a, v_b: [n, H, D] fp16/bf16/fp32 (same dtype). s_a, s_b: [n, H] float32 base-2 LSEs.
    Returns:
        (v [n, H, D] in v_a's dtype, s [n, H] float32).
    """
    v_a, s_a = _check_pair("merge_state", v_a, s_a, names=("v_a", "s_a"))
    v_b, s_b = _check_pair("merge_state", v_b, s_b, *v_a.shape, dtype=v_a.dtype, device=v_a.device, names=("v_b", "s_b"))
    v, s = _two_states(v_a, s_a, v_b, s_b)
    out = torch.empty_like(v_a, memory_format=torch.contiguous_format)
    out_s = torch.empty(s_a.shape, dtype=_F32, device=v_a.device)
    _merge_op(v, s, out, out_s, None)
    return out, out_s


def merge_state_in_place(v: torch.Tensor, s: torch.Tensor, v_other: torch.Tensor, s_other: torch.Tensor,
                         mask: torch.Tensor | None = None) -> None:
    """v, s <- merge_state(v, s, v_other, s_other), for the rows where mask [n] (bool) is True
    (all rows when None; a mask keeps a CUDA graph's shapes fixed)."""
    op = "merge_state_in_place"
    v = check_tensor(op, "v", v, dtype=KV_DTYPES, ndim=3)
    s = check_tensor(op, "s", s, dtype=_F32, shape=tuple(v.shape[:2]), device=v.device)
    v_other, s_other = _check_pair(op, v_other, s_other, *v.shape, dtype=v.dtype, device=v.device,
                                   names=("v_other", "s_other"))
    if v.stride(-1) != 1:
        raise MoeCommValueError(f"{op}: v must be contiguous along head_dim (stride 1), got stride {v.stride(-1)}")
    if mask is not None:
        mask = check_tensor(op, "mask", mask, shape=(v.shape[0],), device=v.device)
        mask = mask.to(torch.int8) if mask.dtype is torch.bool else mask
    stacked_v, stacked_s = _two_states(v, s, v_other, s_other)
    _merge_op(stacked_v, stacked_s, v, s, mask)

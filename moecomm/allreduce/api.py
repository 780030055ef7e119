"""Public entry points of moecomm.allreduce: validate once, allocate, pick the implementation, run."""

# W = world_size (number of peer buffers), n = elements per buffer.

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import MoeCommTypeError, MoeCommValueError
from ..jit.backend import Impl, choose
from .reference import reduce_sum_reference

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_PEERS = 32  # kept equal to _cuda.MAX_PEERS (the kernel's table of peer pointers)


def reduce_sum(peers: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """The reduction step of the one-shot all-reduce: out = peers[0] + peers[1] + ... + peers[W-1].

    Added in rank order with an fp32 accumulator and rounded once, so every rank that reduces the
    same buffers gets bit-identical results. On CUDA tensors it runs kernels/allreduce/reduce.cu
    (compiled on the first call, then cached on disk); elsewhere the reference.

    Args:
        peers: W (1..32) tensors of one shape, dtype (bf16, fp16 or fp32) and device, contiguous: the
            ranks' buffers in rank order (on one GPU: separate buffers standing for virtual ranks).
        out: optional output, the same shape, dtype and device, contiguous (may be one of the peers).

    Returns out (or a new tensor) holding the sum.

        y = reduce_sum([buf0, buf1, buf2, buf3])
    """
    op = "moecomm.allreduce.reduce_sum"
    if isinstance(peers, torch.Tensor) or not isinstance(peers, Sequence):
        raise MoeCommTypeError(f"{op}: peers must be a list or tuple of torch.Tensor, got {type(peers).__name__}")
    if not 1 <= len(peers) <= MAX_PEERS:
        raise MoeCommValueError(f"{op}: peers must hold 1 to {MAX_PEERS} tensors, got {len(peers)}")
    first = peers[0]
    for r, p in enumerate(peers):
        if not isinstance(p, torch.Tensor):
            raise MoeCommTypeError(f"{op}: peers[{r}] must be a torch.Tensor, got {type(p).__name__}")
        if p.dtype not in _DTYPES:
            raise MoeCommTypeError(f"{op}: peers[{r}] must have dtype bfloat16, float16 or float32, got "
                                   f"{str(p.dtype).replace('torch.', '')}")
        if p.dtype != first.dtype or p.shape != first.shape or p.device != first.device:
            raise MoeCommValueError(
                f"{op}: peers[{r}] must match peers[0] (shape {tuple(first.shape)}, {first.dtype}, {first.device}), "
                f"got shape {tuple(p.shape)}, {p.dtype}, {p.device}")
        if not p.is_contiguous():
            raise MoeCommValueError(f"{op}: peers[{r}] must be contiguous, got strides {p.stride()}")
    if out is None:
        out = torch.empty_like(first)
    elif not isinstance(out, torch.Tensor):
        raise MoeCommTypeError(f"{op}: out must be a torch.Tensor, got {type(out).__name__}")
    elif out.dtype != first.dtype or out.shape != first.shape or out.device != first.device or not out.is_contiguous():
        raise MoeCommValueError(
            f"{op}: out must be contiguous with shape {tuple(first.shape)}, {first.dtype}, {first.device}, "
            f"got shape {tuple(out.shape)}, {out.dtype}, {out.device}, strides {out.stride()}")
    if choose(first, op, has=(Impl.CUDA,)) is Impl.CUDA:
        from . import _cuda

        aligned = all(t.data_ptr() % 16 == 0 for t in (*peers, out))
        return _cuda.reduce_sum_cuda(_cuda.peer_pointers(list(peers), first.device), out, aligned16=aligned)
    return reduce_sum_reference(peers, out)

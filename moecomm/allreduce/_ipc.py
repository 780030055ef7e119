"""Launch wrappers of kernels/allreduce/{oneshot,twoshot,rmsnorm}.cu (compiled and loaded by moecomm.jit.cuda).

Nothing here checks user input: custom.py / virtual.py did. A wrapper picks the dtype's entry point,
sizes the grid (layout.grid_blocks) and launches on torch's current stream.

Shape legend: W = world_size, R = ranks covered by one launch (1 on a real GPU, W virtual ranks on
one GPU: grid (blocks, R), blockIdx.y = rank - rank_base), n = elements per rank.
"""

from __future__ import annotations

import ctypes

import torch

from ..jit import cuda
from . import layout
from .layout import Algo

_SUFFIX = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_SOURCE = {Algo.ONESHOT: ("allreduce/oneshot.cu", "moecomm_ar_oneshot_"),
           Algo.TWOSHOT: ("allreduce/twoshot.cu", "moecomm_ar_twoshot_")}
RMSNORM = ("allreduce/rmsnorm.cu", "moecomm_ar_rmsnorm_")


def kernel(which: tuple[str, str], dtype: torch.dtype, device: torch.device) -> cuda.CudaKernel:
    """The loaded entry point of ``which`` (source, name prefix) for ``dtype`` (compiled on first use)."""
    return cuda.load(which[0], which[1] + _SUFFIX[dtype], device=device)


def launch_allreduce(algo: Algo, peer_ptrs: torch.Tensor, world_size: int, rank_base: int, num_ranks: int,
                     out: torch.Tensor, out_stride: int, n: int, err: torch.Tensor, timeout_ns: int,
                     max_blocks: int, in_ptrs: torch.Tensor | None = None) -> None:
    """One-shot or two-shot over the staged inputs of ranks rank_base .. rank_base + num_ranks - 1.

    Args:
        peer_ptrs: [W] int64, every rank's buffer base (its staging holds its n elements).
        out: rank y's n outputs start at out + y * out_stride elements; 16-byte aligned, out_stride a
            multiple of 16 bytes.
        err: [R * ERR_WORDS] int32, the ranks' error words.
        in_ptrs: one-shot only: [W] int64, rank r's registered input (16-byte aligned) instead of its
            staging; None reads the staging.
    """
    blocks = layout.grid_blocks(algo, n, out.element_size(), world_size, max_blocks)
    args = [peer_ptrs, ctypes.c_int(world_size), ctypes.c_int(rank_base), out, ctypes.c_longlong(out_stride),
            ctypes.c_longlong(n), err, ctypes.c_longlong(timeout_ns)]
    if algo is Algo.ONESHOT:
        args.append(in_ptrs if in_ptrs is not None else ctypes.c_void_p(0))
    kernel(_SOURCE[algo], out.dtype, out.device)((blocks, num_ranks), (layout.THREADS,), args)


def launch_rmsnorm(peer_ptrs: torch.Tensor, world_size: int, rank_base: int, num_ranks: int, residual: torch.Tensor,
                   residual_out: torch.Tensor, out: torch.Tensor, stride: int, weight: torch.Tensor, rows: int,
                   hidden: int, eps: float, err: torch.Tensor, timeout_ns: int, max_blocks: int) -> None:
    """Fused one-shot all-reduce + residual add + RMSNorm over the staged [rows, hidden] inputs.

    Args:
        residual, residual_out, out: rank y's [rows, hidden] start at + y * stride elements (contiguous).
        weight: [hidden].
    """
    pack = layout.pack_elems(out.element_size())
    vec = int(hidden % pack == 0 and stride % pack == 0
              and all(t.data_ptr() % 16 == 0 for t in (residual, residual_out, out, weight)))
    blocks = layout.grid_blocks(Algo.ONESHOT, rows * hidden, out.element_size(), world_size, max_blocks, rows=rows)
    kernel(RMSNORM, out.dtype, out.device)(
        (blocks, num_ranks), (layout.THREADS,),
        (peer_ptrs, ctypes.c_int(world_size), ctypes.c_int(rank_base), residual, residual_out, out,
         ctypes.c_longlong(stride), weight, ctypes.c_longlong(rows), ctypes.c_longlong(hidden), ctypes.c_float(eps),
         ctypes.c_int(vec), err, ctypes.c_longlong(timeout_ns)))

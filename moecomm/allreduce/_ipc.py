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
RMSNORM = {Algo.ONESHOT: ("allreduce/rmsnorm.cu", "moecomm_ar_rmsnorm_"),
           Algo.TWOSHOT: ("allreduce/rmsnorm.cu", "moecomm_ar_rmsnorm_twoshot_")}


def _ptr(t: torch.Tensor | None) -> torch.Tensor | ctypes.c_void_p:
    return t if t is not None else ctypes.c_void_p(0)


def kernel(which: tuple[str, str], dtype: torch.dtype, device: torch.device) -> cuda.CudaKernel:
    """The loaded entry point of ``which`` (source, name prefix) for ``dtype`` (compiled on first use)."""
    return cuda.load(which[0], which[1] + _SUFFIX[dtype], device=device)


def launch_allreduce(algo: Algo, peer_ptrs: torch.Tensor, world_size: int, rank_base: int, num_ranks: int,
                     out: torch.Tensor, out_stride: int, n: int, err: torch.Tensor, timeout_ns: int,
                     max_blocks: int, in_ptrs: torch.Tensor | None = None, stage_src: torch.Tensor | None = None,
                     stage_stride: int = 0) -> None:
    """One-shot or two-shot over the inputs of ranks rank_base .. rank_base + num_ranks - 1.

    Args:
        peer_ptrs: [W] int64, every rank's buffer base (its staging holds its n elements).
        out: rank y's n outputs start at out + y * out_stride elements; 16-byte aligned, out_stride a
            multiple of 16 bytes.
        err: [R * ERR_WORDS] int32, the ranks' error words.
        in_ptrs: one-shot only: [W] int64, rank r's registered input (16-byte aligned) instead of its
            staging; None reads the staging.
        stage_src: the kernel copies rank y's input from stage_src + y * stage_stride elements into
            its staging first (16-byte aligned, stage_stride a multiple of 16 bytes); None: the
            inputs are staged already (host copies, or in_ptrs).
    """
    blocks = layout.grid_blocks(algo, n, out.element_size(), world_size, max_blocks)
    args = [peer_ptrs, ctypes.c_int(world_size), ctypes.c_int(rank_base), out, ctypes.c_longlong(out_stride),
            ctypes.c_longlong(n), err, ctypes.c_longlong(timeout_ns)]
    if algo is Algo.ONESHOT:
        args.append(_ptr(in_ptrs))
    args += [_ptr(stage_src), ctypes.c_longlong(stage_stride)]
    kernel(_SOURCE[algo], out.dtype, out.device)((blocks, num_ranks), (layout.THREADS,), args)


def launch_rmsnorm(algo: Algo, peer_ptrs: torch.Tensor, world_size: int, rank_base: int, num_ranks: int,
                   x: torch.Tensor | None, residual: torch.Tensor, residual_out: torch.Tensor, out: torch.Tensor,
                   stride: int, weight: torch.Tensor, rows: int, hidden: int, eps: float, err: torch.Tensor,
                   timeout_ns: int, max_blocks: int) -> None:
    """Fused all-reduce (one-shot or two-shot by rows) + residual add + RMSNorm of [rows, hidden] inputs.

    Args:
        x: rank y's input [rows, hidden] at x + y * stride elements, copied into its staging by the
            kernel; None: staged already (host copies). Aligned like the others when vec applies.
        residual, residual_out, out: rank y's [rows, hidden] start at + y * stride elements (contiguous).
        weight: [hidden].
    TWOSHOT needs ceil(rows / W) <= layout.MAX_NORM_ROWS (the caller checks).
    """
    pack = layout.pack_elems(out.element_size())
    vec = int(hidden % pack == 0 and stride % pack == 0
              and all(t.data_ptr() % 16 == 0 for t in (residual, residual_out, out, weight) + ((x,) if x is not None else ())))
    blocks = layout.grid_blocks(algo, rows * hidden, out.element_size(), world_size, max_blocks, rows=rows)
    kernel(RMSNORM[algo], out.dtype, out.device)(
        (blocks, num_ranks), (layout.THREADS,),
        (peer_ptrs, ctypes.c_int(world_size), ctypes.c_int(rank_base), _ptr(x), residual, residual_out, out,
         ctypes.c_longlong(stride), weight, ctypes.c_longlong(rows), ctypes.c_longlong(hidden), ctypes.c_float(eps),
         ctypes.c_int(vec), err, ctypes.c_longlong(timeout_ns)))


def stage_in_kernel(x: torch.Tensor, per_rank_elems: int) -> bool:
    """Whether the kernels can copy ``x`` (rank y's input at + y * per_rank_elems) into the staging
    themselves: contiguous, 16-byte aligned, every rank's start 16-byte aligned."""
    return x.is_contiguous() and x.data_ptr() % 16 == 0 and (per_rank_elems * x.element_size()) % 16 == 0

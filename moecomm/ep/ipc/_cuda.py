"""Launch wrappers of kernels/ep/ll.cu (compiled, cached and loaded by moecomm.jit.cuda).

Nothing here checks user input: the dispatcher did. Each wrapper picks the entry point, decides the
16-byte vector path, sizes the grid and launches on torch's current stream (one rank's launch; with
virtual ranks the caller puts each rank on its own stream).
"""

# T = num_tokens, H = hidden, k = top_k, W = ep_size, C = capacity, N = expanded rows

from __future__ import annotations

import ctypes

import torch

from ...jit import cuda
from .layout import LLLayout

SOURCE = "ep/ll.cu"
THREADS = 256  # LL_THREADS in ll.cu
FP8_MAX_H = 16384  # LL_FP8_MAX_H in ll.cu
_COMBINE = {torch.bfloat16: "moecomm_ll_combine_bf16", torch.float16: "moecomm_ll_combine_fp16",
            torch.float32: "moecomm_ll_combine_fp32"}
_sm_count: dict[int, int] = {}


def kernel(name: str, device: torch.device) -> cuda.CudaKernel:
    return cuda.load(SOURCE, name, device=device)


def _sms(device: torch.device) -> int:
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _sm_count:
        _sm_count[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _sm_count[i]


def grid_blocks(work: int, device: torch.device, ranks_on_device: int) -> int:
    """Blocks of one rank's launch: one per token (dispatch) or per row (combine), at most the SMs
    shared by the ranks on this device, at least 1 (the last block signals even when T = 0). Only
    one block a rank spins (ll.cu), so this bound is for speed, not for progress."""
    return max(1, min(work, _sms(device) // max(1, ranks_on_device)))


def dispatch_cuda(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, e2r: torch.Tensor, e2l: torch.Tensor,
                  peer_ptrs: torch.Tensor, home: torch.Tensor, lay: LLLayout, rank: int, timeout_ns: int,
                  ranks_on_device: int) -> None:
    """One rank's ll_dispatch. x [T, H] contiguous; ids [T, k] int32 and weights [T, k] fp32
    contiguous; e2r, e2l [E] int32; peer_ptrs [W] int64; home [T, k] int32 out (contiguous)."""
    T = x.shape[0]
    fp8 = lay.payload == "fp8"  # x bf16; the kernel quantises (the source of a copy is then shared memory, 16-aligned)
    vec = int(lay.token_bytes % 16 == 0 and lay.row_bytes % 16 == 0 and (fp8 or x.data_ptr() % 16 == 0)
              and lay.recv_off % 16 == 0)
    args = (x, ids, weights, e2r, e2l, peer_ptrs, home, ctypes.c_int(rank), ctypes.c_int(lay.world_size), ctypes.c_int(T),
            ctypes.c_int(lay.top_k), ctypes.c_int(e2r.shape[0]), ctypes.c_int(lay.capacity), ctypes.c_int(lay.token_bytes),
            ctypes.c_int(lay.row_bytes), ctypes.c_int(lay.meta_off), ctypes.c_longlong(lay.recv_off),
            ctypes.c_longlong(timeout_ns), ctypes.c_int(vec))
    if fp8:
        args += (ctypes.c_int(lay.hidden),)
    kernel(dispatch_entry(lay), x.device)((grid_blocks(T, x.device, ranks_on_device),), (THREADS,), args)


def dispatch_entry(lay: LLLayout) -> str:
    """ll.cu's dispatch entry point for the layout's payload."""
    return "moecomm_ll_dispatch_fp8" if lay.payload == "fp8" else "moecomm_ll_dispatch"


def combine_cuda(expert_out: torch.Tensor, slot_pos: torch.Tensor, peer_ptrs: torch.Tensor, lay: LLLayout, rank: int,
                 timeout_ns: int, ranks_on_device: int) -> None:
    """One rank's ll_combine. expert_out [N, H] contiguous of the layout's dtype; slot_pos [W * C, k]
    int32 contiguous (the dispatch's); the partial sums go into the sources' BACK regions."""
    rows = lay.world_size * lay.capacity
    vec = int(lay.back_row_bytes % 16 == 0 and expert_out.data_ptr() % 16 == 0 and lay.back_off % 16 == 0)
    kernel(_COMBINE[lay.dtype], expert_out.device)(
        (grid_blocks(rows, expert_out.device, ranks_on_device),), (THREADS,),
        (expert_out, slot_pos, peer_ptrs, ctypes.c_int(rank), ctypes.c_int(lay.world_size), ctypes.c_int(lay.capacity),
         ctypes.c_int(lay.top_k), ctypes.c_int(lay.hidden), ctypes.c_int(expert_out.shape[0]),
         ctypes.c_longlong(lay.back_off), ctypes.c_longlong(timeout_ns), ctypes.c_int(vec)))

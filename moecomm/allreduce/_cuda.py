"""Launch wrapper of kernels/allreduce/reduce.cu (compiled, cached and loaded by moecomm.jit.cuda).

Nothing here checks user input: api.py did. The wrapper picks the dtype's entry point, decides
whether the 16-byte vector path applies, sizes the grid and launches on torch's current stream.
"""

# W = world_size (number of peer buffers), n = elements per buffer.

from __future__ import annotations

import ctypes

import torch

from ..jit import cuda

SOURCE = "allreduce/reduce.cu"
MAX_PEERS = 32  # MAX_PEERS in reduce.cu (the shared-memory table of peer pointers)
THREADS = 512
_ENTRY = {torch.bfloat16: "moecomm_reduce_bf16", torch.float16: "moecomm_reduce_fp16",
          torch.float32: "moecomm_reduce_fp32"}
_sm_count: dict[int, int] = {}


def kernel(dtype: torch.dtype, device: torch.device) -> cuda.CudaKernel:
    """The loaded entry point for ``dtype`` on ``device`` (compiled on first use, then cached)."""
    return cuda.load(SOURCE, _ENTRY[dtype], device=device)


def peer_pointers(peers: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """[W] int64 on ``device``: the peers' data pointers, the device array the kernel reads.

    Built per call here (one small host-to-device copy); the IPC all-reduce builds it once per buffer.
    """
    return torch.tensor([p.data_ptr() for p in peers], dtype=torch.int64, device=device)


def reduce_sum_cuda(peer_ptrs: torch.Tensor, out: torch.Tensor, *, aligned16: bool) -> torch.Tensor:
    """out[i] = sum over r of peers[r][i] (rank order, fp32), the peers given by their pointers.

    Args:
        peer_ptrs: [W] int64 on out's device, each pointing at n elements of out's dtype (W <= 32).
        out: [n] contiguous bf16/fp16/fp32 (any shape with n elements, contiguous).
        aligned16: every peer pointer and out are 16-byte aligned (vector loads); else scalar loads.
    """
    n = out.numel()
    if n == 0:
        return out
    pack = 16 // out.element_size()
    work = -(-n // pack) if aligned16 else n  # packs plus a tail, or single elements
    dev = out.device.index if out.device.index is not None else torch.cuda.current_device()
    if dev not in _sm_count:
        _sm_count[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    # a grid-stride loop: up to 4 blocks of 512 threads per SM keep enough 16-byte loads in flight
    blocks = max(1, min(-(-work // THREADS), 4 * _sm_count[dev]))
    kernel(out.dtype, out.device)(
        (blocks,), (THREADS,),
        (peer_ptrs, out, ctypes.c_int(peer_ptrs.numel()), ctypes.c_longlong(n), ctypes.c_int(int(aligned16))))
    return out

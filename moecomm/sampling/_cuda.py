"""Launch wrapper of kernels/sampling/sample.cu: sampling from fp32 probabilities with top-k / top-p /
min-p (compiled, cached and loaded by moecomm.jit.cuda; the design and its napkin math are in the
.cu file's header).

# B = output rows, R = rows of probs, V = vocab, CAP = list capacity (keys of shared memory)

Nothing here checks user input: api.py did. ``covers`` says whether the kernel implements a call
(else the Triton kernel runs it); ``plan_launch`` builds the flags and the argument list (no
device needed: tests check it against the kernel's PTX signature and run it through a host
emulation of the source); ``launch_sample`` launches on torch's current stream, with no host sync
(seeds, offsets and per-row parameters given as tensors are read on the device). Each entry point
is its own translation unit, compiled on its first launch (entry_flags: sample.cu built with only
that entry defined; on the 2-core CPU machine 6.9 s of front end instead of ~33 s for the whole
file's PTX, then one entry's ptxas).
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

from ..jit import cuda

SOURCE = "sampling/sample.cu"
THREADS = 1024  # __launch_bounds__(1024, 1) in sample.cu
PAIRED_THREADS = 512  # the _paired entries: __launch_bounds__(512, 2)
# the paired list: two blocks' dynamic (16 bytes a key) and static shared memory and the 1 KB the
# driver reserves a block fit an H100/H200 SM's 228 KB: 2 x (16 x 6656 + 8192 + 1024) = 231424
PAIRED_CAPACITY = 6656
PAIRED_SHARED_BYTES = 16 * PAIRED_CAPACITY  # a paired block's dynamic shared memory (106496 bytes)
# PAIRED: None = paired blocks for calls with a top-k of at most PAIRED_MAX_TOP_K (one value for the
# batch), or top-p without top-k (PAIRED_TOP_P), over at least PAIRED_MIN_ROWS_PER_SM rows an SM;
# True / False force them on / off (benchmarks, tests). Measured on the H200 (132 SMs;
# bench_sampling, eager medians, lean layout; two calls of 2026-12-02 on two machines, the other
# pairing timed as the control row): top-p 0.9 at B512 V151936 0.241 / 0.242 ms paired, 0.275 /
# 0.276 single; top-k 50 + top-p 0.9 at B512 0.138 / 0.140 paired, 0.162 / 0.163 single: pairing
# wins where one block's memory-bound pass A overlaps the other's select (sample.cu's header). At
# B128 (< 1 row an SM) the two calls disagree: top-p 0.082 paired vs 0.099 single (bin map) in the
# first, 0.083 paired vs 0.066 single (exponent map) in the second; top-k + top-p 0.060 vs 0.062,
# then 0.114 vs 0.106: eager medians under ~0.1 ms follow the host's launch cost, which differed
# ~2x between the machines. So the cut stays at 2 rows an SM, where both calls agree. B1: a tie.
PAIRED: bool | None = None
PAIRED_MIN_ROWS_PER_SM = 2
PAIRED_MAX_TOP_K = 1024
# PAIRED_TOP_P: top-p without top-k (the q-sum entries) over >= PAIRED_MIN_ROWS_PER_SM rows an SM
# takes the paired entries too (with LEAN_SCRATCH only: the classic paired list is too short).
PAIRED_TOP_P = True
# LEAN_SCRATCH: the paired entries' shared memory split as [list | scratch of lean_scratch_bytes(V)]
# instead of [list | scratch as large as the list]: the scratch holds pass A's bins and sector map
# (8 KB + V / 8 bytes) and the selects' copies (top-p's uncertain bins, ~0.5-1K keys; whole lists
# up to the scratch's keys), the list gets the rest: 9856 keys at V151936 (top-p 0.9's lists there:
# ~4.7-8.7K keys, the plan's bound ~4.9-9.1K) instead of 6656. False: the classic split (control).
LEAN_SCRATCH = True
LEAN_SCRATCH_MAX = 48 * 1024  # beyond (V > ~320K): a 24 KB scratch, no sector map
MAP_OFFSET_BYTES = 2048 * 4  # sample.cu's MAP_OFFSET: the sector map follows pass A's 2048 bins
SCRATCH_KB_SHIFT = 20  # sample.cu's SCRATCH_KB_SHIFT: flags bits 20-27 give the lean scratch in KB
DEFAULT_CAPACITY = 12288  # list keys: 2 x 96 KB of shared memory (list + scratch)
MIN_CAPACITY = 4096  # below this the fallback would run too often to be worth the kernel
HIST_SCRATCH_BYTES = 24576  # the scratch also holds the fallback's 2048 counts + 2048 fp64 masses
STATIC_SMEM_BYTES = 8192  # sample.cu's __shared__ arrays (5.7 KB by ptxas -v), rounded up
MAX_VOCAB = 2**31 - 2**20  # api._check_dist's bound: indices and quad counters fit int32
# LIST_CAPACITY: None = the device's (DEFAULT_CAPACITY, or less where shared memory is smaller);
# tests set a small number to force the fallback paths (list overflow, window, radix levels).
LIST_CAPACITY: int | None = None

ENTRY = {"count": "moecomm_sample_probs_count", "qsum": "moecomm_sample_probs_qsum",
         "none": "moecomm_sample_probs_none"}
PAIRED_ENTRY = {k: v + "_paired" for k, v in ENTRY.items()}
# sample.cu's F_* flags
F_ROWMAP, F_ROWMAP64, F_OUT64, F_HAS_K, F_K_TENSOR, F_K64, F_HAS_P, F_P_TENSOR = (1 << i for i in range(8))
F_HAS_MINP, F_MINP_TENSOR, F_TOPK_FIRST, F_SEED_TENSOR, F_SEED_PER_ROW, F_OFFSET_TENSOR, F_OFFSET_PER_ROW, F_LOGPROB = (
    1 << i for i in range(8, 16))
F_SECTOR_MAP, F_MAP_BINS, F_PASS_A_LIST, F_PASS_B_REVERSE = 1 << 16, 1 << 17, 1 << 18, 1 << 19
F_PASS_B_GATHER, F_PASS_A_PIPE, F_SPLIT_SLICE = 1 << 28, 1 << 29, 1 << 30  # (bits 20-27: the lean scratch's KB)
# Pass A writes a byte per 32-byte sector (its largest exponent) so that pass B loads only the sectors
# that can hold a listed token; False: pass B reads the whole row (the benchmark's control row).
SECTOR_MAP = True
# SECTOR_MAP_BINS: the map's byte is the sector's largest pass-A bin (1/8 binade, from 2^-32) instead
# of its largest exponent, so pass B also skips the sectors of b0's binade below b0's bin (top-p 0.9,
# logits x 3: ~32% of the sectors loaded instead of ~40% at V151936, ~43% at V128256). False (the
# default): the exponent map; the bin map is the benchmark's control row. Loading fewer sectors did
# not pay on the H200 (bench_sampling, one run, ms): top-p B128 V128256 single blocks 0.0988 by bins,
# 0.0896 by exponents; B512 V151936 paired 0.2407 / 0.2411; top-k + top-p B512 0.1382 / 0.1388.
SECTOR_MAP_BINS = False
# PAIRED_TOP_P_SECTOR_MAP: whether top-p alone on the paired entries (B >= 2 rows an SM) writes and
# reads the sector map. True since pass B gathers its sectors and pass A is pipelined (PASS_B_GATHER,
# PASS_A_PIPE): B512 V151936 in CUDA-graph replay 219.0 / 219.2 us with the map, 223.7 / 223.8
# without, in two H200 calls of 2026-12-03 (eager 0.2186 / 0.2183 vs 0.2230 / 0.2239 ms). Before
# them the map lost (2026-12-02: 0.2411 / 0.2424 ms with, 0.2276 / 0.2288 without). False: pass B
# reads the whole row (the control row).
PAIRED_TOP_P_SECTOR_MAP = True
# PASS_A_LIST: top-p without top-k (the q-sum entries: single, paired and split) lists its candidates
# during pass A (every token at or above a threshold set from the first iteration's bins, ~10K keys
# a row) and skips pass B where they cover the plan's bins (sample.cu's pass_a_threshold); no sector
# map then. False: pass B as before. Off by default until the H200 rows (bench_sampling's
# "moecomm[cuda-passa]" control row, tokens checked against the default's) and the host emulation's
# path tests say it pays and is exact.
PASS_A_LIST = False
# PASS_B_REVERSE: pass B reads the row's chunks last to first (sample.cu's list_above), so that the
# tail pass A read last is still in the L2 when pass B reads it (B128 V128256 is 66 MB against the
# H200's 60 MB of L2). The tokens are the same either way. False: first to last (the control row).
PASS_B_REVERSE = True
# PASS_B_GATHER: with the sector map, one block a row (single and paired entries; not the split rows),
# pass B first gathers the sectors to load, a warp's 64 at a time, so that every lane loads UNROLL
# quads a round: ~40% of the rounds of the loop over fixed quads, whose lanes load ~40% of theirs
# (pass B waits on memory latency a round, not on bytes). The tokens are the same. False: the loop
# over fixed quads (the control row).
PASS_B_GATHER = True
# PASS_A_PIPE: pass A (and pass_a_list) issues the next chunk's loads before it works on the current
# one (sample.cu's for_each_chunk: 2 quads a chunk, 4 in flight a thread), so that the atomics and
# appends overlap memory latency. False: chunks of 4 quads, loaded then worked on (the control row).
PASS_A_PIPE = True
# SPLIT_SLICE: a split row's block keeps its slice of the row in shared memory (pass A writes it,
# pass B and the race read it there: sample.cu's split_slice), where it fits beside the list and a
# SPLIT_SLICE_SCRATCH scratch (V128256 at a cluster of 8: 63 KB a block); no sector map then.
# False: pass B reads the slice from the L2 / HBM with the map (the control row).
SPLIT_SLICE = True
SPLIT_SLICE_SCRATCH = 32 * 1024  # pass A's bins, the cluster's summed bins, a 2048-key gather list
# PDL: when api drew the seed on the device just before (torch.randint, the default seed under CUDA
# graph capture), the kernel is launched with programmatic stream serialisation: it may start when
# the randint kernel's block exits, before that kernel completes and its writes are flushed (the
# launch gap between two kernels), and waits for it only before reading the seed (row_rng). Off
# until measured (session 22 had no GPU): bench_sampling's graph rows moecomm[cuda-pdl] turn it on.
PDL = False
# Split rows (sample.cu's sample_row_split): a row over a thread-block cluster of SPLIT_SIZES blocks
# (sm_90 and later), for batches whose single blocks leave SMs idle: one block streams a row at ~10
# GB/s (B1 V128256: ~57 us), a cluster of 8 cuts pass A and pass B 8-fold. SPLIT: None = by the
# batch (split_blocks: the largest size with rows x size <= SPLIT_MAX_BLOCKS, only where PAIRED is
# None); an int forces that cluster size (1: off; benchmarks, tests). Not for min-p alone.
SPLIT: int | None = None
SPLIT_SIZES = (8,)
# SPLIT_MAX_BLOCKS: the split rows' blocks must run in one wave: a cluster of 8 needs 8 free SMs
# of one GPC (an H200's GPCs hold 14-18 of its 132 SMs). Measured (H200, CUDA-graph replay, top-p
# V128256, 2026-12-02 call 1): B1 31.7 us split / 57.1 one block a row, B4 32.3 / 58.5, but B16
# 61.0 / 60.1 (top-k + top-p 48.4 / 37.2): 16 clusters of 8 took two waves. 96 blocks: 12 rows.
SPLIT_MAX_BLOCKS = 96
# A cluster of 16 (non-portable: the kernel opted in with NON_PORTABLE_CLUSTER_SIZE_ALLOWED) was
# slower at B1 in CUDA-graph replay (H200, 2026-12-02 session 13: 34.6 us against 31.8 for 8): its
# pass A and pass B are half as long, but the plan (6.9 us), rank 0's select (7.4 us) and the
# barriers are not shorter (benchmarks/RESULTS.md). Not built.
SPLIT_ENTRY = {(k, c): ENTRY[k] + f"_split{c}" for k in ("count", "qsum") for c in SPLIT_SIZES}
MODE_SAMPLE = 0
_optin: dict[int, int] = {}


class Launch(NamedTuple):
    """One launch of sample.cu: entry point, grid, block, dynamic shared memory, arguments."""

    entry: str
    grid: tuple[int]
    block: tuple[int]
    shared_bytes: int
    args: tuple


def effective_filters(top_k, top_p, min_p, vocab: int):
    """(top_k, top_p, min_p) with the scalar no-ops dropped (top_k >= V, top_p >= 1, min_p <= 0):
    each keeps every positive token, so the reference's kept set is the same without it."""
    if top_k is not None and not isinstance(top_k, torch.Tensor) and top_k >= vocab:
        top_k = None
    if top_p is not None and not isinstance(top_p, torch.Tensor) and top_p >= 1.0:
        top_p = None
    if min_p is not None and not isinstance(min_p, torch.Tensor) and min_p <= 0.0:
        min_p = None
    return top_k, top_p, min_p


def covers(
    x: torch.Tensor, rowmap, num_rows: int, out: torch.Tensor, valid: torch.Tensor, logprob, y,
    mode: int, from_logits: bool, top_k, top_p, min_p, temperature, top_k_first: bool,
    seed, offset, per_row_seed: bool,
) -> bool:
    """Whether launch_sample implements this call (its arguments): fp32 probabilities with unit column
    stride, MODE_SAMPLE, no temperature, at least one of top-k / top-p / min-p that filters (plain
    sampling is one pass of the Triton kernel's race, which this kernel cannot beat), and a device
    whose shared memory holds the list."""
    if mode != MODE_SAMPLE or from_logits or temperature is not None or y is not None:
        return False
    if x.dtype is not torch.float32 or x.dim() != 2:
        return False
    vocab = x.shape[1]
    if vocab < 1 or vocab >= MAX_VOCAB or (vocab > 1 and x.stride(1) != 1):
        return False
    if isinstance(top_k, torch.Tensor) and top_k.dtype not in (torch.int32, torch.int64):
        return False
    k, p, m = effective_filters(top_k, top_p, min_p, vocab)
    if k is None and p is None and m is None:
        return False
    return device_ok(x.device)


def shared_bytes(capacity: int, scratch_bytes: int | None = None) -> int:
    """Dynamic shared memory of a launch: the list (capacity keys) and the scratch (scratch_bytes,
    or in the classic layout as many bytes as the list, >= 24 KB)."""
    if scratch_bytes is None:
        scratch_bytes = max(8 * capacity, HIST_SCRATCH_BYTES)
    return 8 * capacity + scratch_bytes


def lean_scratch_bytes(vocab: int) -> int:
    """The lean layout's scratch (whole KB, what sample.cu reads from the flags): pass A's bins and
    the sector map (a byte per 8 tokens) when they fit LEAN_SCRATCH_MAX, and at least the 24 KB of
    the fallback's counts and masses. 27 KB at V151936, 24 KB at V128256."""
    need = MAP_OFFSET_BYTES + ((vocab + 3) // 4 + 1) // 2
    if need > LEAN_SCRATCH_MAX:
        need = HIST_SCRATCH_BYTES  # the kernel then finds no room for the map and goes without it
    return max(HIST_SCRATCH_BYTES, -(-need // 1024) * 1024)


def capacity(device: torch.device) -> int:
    """The list's capacity in keys: LIST_CAPACITY if set, else DEFAULT_CAPACITY or what the device's
    shared memory a block (opt-in) holds beside the static arrays (H100/H200: 227 KB, the default fits).
    Memoised per device (twice a call: covers and the plan; ~0.1 us instead of ~0.7)."""
    if LIST_CAPACITY is not None:
        return int(LIST_CAPACITY)
    cap = _capacity.get(device)
    if cap is None:
        cap = _device_capacity(device)
        if device.type != "cuda" or device.index is not None:  # "cuda" alone follows the current device
            _capacity[device] = cap
    return cap


_capacity: dict[torch.device, int] = {}


def _device_capacity(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_CAPACITY
    room = (_optin_bytes(device) - STATIC_SMEM_BYTES) // 16
    return max(0, min(DEFAULT_CAPACITY, room // 1024 * 1024))


def _optin_bytes(device: torch.device) -> int:
    """Shared memory a block may opt in to (a CPU tensor, which only the host emulation launches:
    an H100 / H200's 227 KB)."""
    if device.type != "cuda":
        return 227 * 1024
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _optin:
        props = torch.cuda.get_device_properties(index)
        _optin[index] = int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)
    return _optin[index]


def split_slice_bytes(vocab: int, cluster: int) -> int:
    """A split block's slice of the row (sample.cu's chunk: a multiple of 32 quads), in bytes."""
    nq = (vocab + 3) // 4
    return 16 * ((-(-nq // cluster) + 31) // 32 * 32)


def split_slice_layout(device: torch.device, vocab: int, cluster: int, cap: int) -> int | None:
    """The list capacity of a split launch with F_SPLIT_SLICE (the list, a SPLIT_SLICE_SCRATCH
    scratch and the slice within the block's shared memory; the capacity cut to fit, not below
    MIN_CAPACITY), or None where the slice does not fit (then the layout without it)."""
    room = _optin_bytes(device) - STATIC_SMEM_BYTES - SPLIT_SLICE_SCRATCH - split_slice_bytes(vocab, cluster)
    fit = min(cap, room // 8 // 1024 * 1024)
    return fit if fit >= min(cap, MIN_CAPACITY) else None


def device_ok(device: torch.device) -> bool:
    """The device's shared memory holds a list of at least MIN_CAPACITY keys (sm_80 and later do)."""
    return LIST_CAPACITY is not None or capacity(device) >= MIN_CAPACITY


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype is torch.float32 else t.float()


def _float_param(v, dummy: torch.Tensor, off: float, has_flag: int, tensor_flag: int):
    """(tensor argument, scalar argument, flags) of a float parameter: None (off), a float or a [B] tensor."""
    if v is None:
        return dummy, off, 0
    if isinstance(v, torch.Tensor):
        return _f32(v), off, has_flag | tensor_flag
    return dummy, float(v), has_flag


# sample.cu's MOECOMM_SAMPLE_PARAMS, in order: 10 pointers (x, rowmap, out, valid, logprob, top_k,
# top_p, min_p, seed, offset), then V, R, x's row stride, top_k, top_p, min_p, seed, offset, flags,
# the list's capacity. tests/sampling/test_sampling_cuda.py checks it against the PTX of each entry.
SCALAR_TYPES = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_double, ctypes.c_float,
                ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int, ctypes.c_int)
SIGNATURE = cuda.Signature((ctypes.c_void_p,) * 10 + SCALAR_TYPES)


def _plan(
    x: torch.Tensor, rowmap, num_rows: int, out: torch.Tensor, valid: torch.Tensor, logprob, top_k, top_p, min_p,
    top_k_first: bool, seed, offset, per_row_seed: bool,
) -> tuple[str, tuple, list, int]:
    """(entry, the 10 tensor arguments, the 10 scalar values as ints / floats, dynamic shared bytes): what
    plan_launch wraps in ctypes and launch_sample packs directly (one code for both, so the list
    the tests check against the PTX is the one launched)."""
    num_in_rows, vocab = x.shape
    top_k, top_p, min_p = effective_filters(top_k, top_p, min_p, vocab)
    dummy = out
    flags = ((F_LOGPROB if logprob is not None else 0) | (F_SECTOR_MAP if SECTOR_MAP else 0)
             | (F_PASS_B_REVERSE if PASS_B_REVERSE else 0) | (F_PASS_B_GATHER if PASS_B_GATHER else 0)
             | (F_PASS_A_PIPE if PASS_A_PIPE else 0))
    if SECTOR_MAP and SECTOR_MAP_BINS:
        flags |= F_MAP_BINS
    if rowmap is not None:
        flags |= F_ROWMAP | (F_ROWMAP64 if rowmap.dtype is torch.int64 else 0)
    if out.dtype is torch.int64:
        flags |= F_OUT64
    k_t, k_v = dummy, 0
    if top_k is not None:
        flags |= F_HAS_K
        if isinstance(top_k, torch.Tensor):
            k_t = top_k
            flags |= F_K_TENSOR | (F_K64 if top_k.dtype is torch.int64 else 0)
        else:
            k_v = int(top_k)
    p_t, p_v, p_flags = _float_param(top_p, dummy, 1.0, F_HAS_P, F_P_TENSOR)
    m_t, m_v, m_flags = _float_param(min_p, dummy, 0.0, F_HAS_MINP, F_MINP_TENSOR)
    flags |= p_flags | m_flags
    if top_k_first:
        flags |= F_TOPK_FIRST
    seed_t, seed_v = dummy, 0
    if isinstance(seed, torch.Tensor):
        seed_t = seed
        flags |= F_SEED_TENSOR | (F_SEED_PER_ROW if per_row_seed else 0)
    else:
        seed_v = _as_int64(seed)
    off_t, off_v = dummy, 0
    if isinstance(offset, torch.Tensor):
        off_t = offset
        flags |= F_OFFSET_TENSOR | (F_OFFSET_PER_ROW if offset.numel() > 1 and num_rows > 1 else 0)
    else:
        off_v = _as_int64(offset)
    kind = "count" if top_k is not None else ("qsum" if top_p is not None else "none")
    scratch = None
    split = split_blocks(x.device, num_rows, top_k, top_p)
    slice_bytes = 0
    if split > 1:
        entry, cap = SPLIT_ENTRY[kind, split], capacity(x.device)
        fit = split_slice_layout(x.device, vocab, split, cap) if SPLIT_SLICE and not (
            kind == "qsum" and PASS_A_LIST) else None
        if fit is not None:
            cap, scratch, slice_bytes = fit, SPLIT_SLICE_SCRATCH, split_slice_bytes(vocab, split)
            flags = (flags | F_SPLIT_SLICE | (scratch // 1024) << SCRATCH_KB_SHIFT) & ~(F_SECTOR_MAP | F_MAP_BINS)
    elif not paired(x.device, num_rows, top_k, top_p):
        entry, cap = ENTRY[kind], capacity(x.device)
    elif LEAN_SCRATCH:
        scratch = lean_scratch_bytes(vocab)
        entry, cap = PAIRED_ENTRY[kind], min(capacity(x.device), (PAIRED_SHARED_BYTES - scratch) // 8)
        flags |= (scratch // 1024) << SCRATCH_KB_SHIFT
    else:
        entry, cap = PAIRED_ENTRY[kind], min(capacity(x.device), PAIRED_CAPACITY)
    if kind == "qsum" and entry == PAIRED_ENTRY[kind] and not PAIRED_TOP_P_SECTOR_MAP:
        flags &= ~(F_SECTOR_MAP | F_MAP_BINS)
    if kind == "qsum" and PASS_A_LIST:
        flags = (flags | F_PASS_A_LIST) & ~(F_SECTOR_MAP | F_MAP_BINS)
    tensors = (x, rowmap if rowmap is not None else dummy, out, valid, logprob if logprob is not None else dummy,
               k_t, p_t, m_t, seed_t, off_t)
    return (entry, tensors, [vocab, num_in_rows, x.stride(0), k_v, p_v, m_v, seed_v, off_v, flags, cap],
            shared_bytes(cap, scratch) + slice_bytes)


def plan_launch(
    x: torch.Tensor, rowmap, num_rows: int, out: torch.Tensor, valid: torch.Tensor, logprob, top_k, top_p, min_p,
    top_k_first: bool, seed, offset, per_row_seed: bool,
) -> Launch:
    """The launch of sample.cu for a call that covers() accepts (arguments as launch_sample's);
    its args are the tensors and ctypes scalars of SIGNATURE, in order."""
    entry, tensors, scalars, smem = _plan(x, rowmap, num_rows, out, valid, logprob, top_k, top_p, min_p,
                                          top_k_first, seed, offset, per_row_seed)
    args = tensors + tuple(t(v) for t, v in zip(SCALAR_TYPES, scalars))
    return Launch(entry, (num_rows * cluster_of(entry),), (threads_of(entry),), smem, args)


def cluster_of(entry: str) -> int:
    """The blocks a row of an entry point: its cluster size (_split<c> entries), else 1."""
    head, _, c = entry.rpartition("_split")
    return int(c) if head else 1


def split_blocks(device: torch.device, num_rows: int, top_k, top_p=None) -> int:
    """The cluster size a row of this launch is split over (1: one block a row; see SPLIT). By the
    batch: the largest of SPLIT_SIZES with num_rows x size <= SPLIT_MAX_BLOCKS, for calls with a
    top-k or a top-p (min-p alone has nothing to select), on sm_90 and later, where PAIRED is None."""
    if top_k is None and top_p is None:
        return 1
    if SPLIT is not None:
        return int(SPLIT) if int(SPLIT) in SPLIT_SIZES else 1
    if PAIRED is not None or num_rows < 1 or not _clusters(device):
        return 1
    fits = [c for c in SPLIT_SIZES if num_rows * c <= SPLIT_MAX_BLOCKS]
    return max(fits) if fits else 1


_cluster_ok: dict = {}


def programmatic_ok(device: torch.device) -> bool:
    """Programmatic dependent launch (griddepcontrol): a CUDA device of compute capability 9.0 and later."""
    return device.type == "cuda" and _clusters(device)


def _clusters(device: torch.device) -> bool:
    """Thread-block clusters: a CUDA device of compute capability 9.0 and later (a CPU tensor, which
    only the host emulation launches, plans without them unless SPLIT says so)."""
    ok = _cluster_ok.get(device)
    if ok is None:
        ok = False
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            ok = torch.cuda.get_device_capability(index)[0] >= 9
        _cluster_ok[device] = ok
    return ok


def threads_of(entry: str) -> int:
    """The block size of an entry point."""
    return PAIRED_THREADS if entry.endswith("_paired") else THREADS


def paired(device: torch.device, num_rows: int, top_k, top_p=None) -> bool:
    """Whether a launch of num_rows rows with this (effective) top_k and top_p takes the paired
    entries (see PAIRED and PAIRED_TOP_P)."""
    if PAIRED is not None:
        return bool(PAIRED)
    if top_k is None:
        if top_p is None or not (PAIRED_TOP_P and LEAN_SCRATCH):
            return False
    elif isinstance(top_k, torch.Tensor) or int(top_k) > PAIRED_MAX_TOP_K:
        return False
    return num_rows >= PAIRED_MIN_ROWS_PER_SM * _sm_count(device)


_sms: dict = {}


def _sm_count(device: torch.device) -> int:
    n = _sms.get(device)
    if n is None:
        n = 132
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            n = int(torch.cuda.get_device_properties(index).multi_processor_count)
        _sms[device] = n
    return n


def _as_int64(v) -> int:
    """v as the int64 the kernel reads (mod 2^64); api passes int64 values already: returned as they are."""
    if type(v) is int and -2**63 <= v < 2**63:
        return v
    v = int(v) % 2**64
    return v - 2**64 if v >= 2**63 else v


def launch_sample(
    x: torch.Tensor, rowmap, num_rows: int, out: torch.Tensor, valid: torch.Tensor, logprob, y,
    mode: int, from_logits: bool, top_k, top_p, min_p, temperature, top_k_first: bool,
    seed, offset, per_row_seed: bool, programmatic: bool = False,
) -> None:
    """Sample num_rows tokens (the signature of _triton.launch_sample, for the calls covers() accepts).
    programmatic: the stream's previous kernel is the one that wrote the seed tensor and nothing else
    this kernel reads: with PDL on, launched programmatically (it waits for that kernel only where
    it reads the seed and offset: row_rng in sample.cu).

    Args:
        x: [R, V] fp32 probabilities, unit column stride. rowmap: [B] int32/int64 rows of x, or None.
        out: [B] int32/int64 tokens; valid: [B] bool; logprob: [B] fp32 or None. y: None.
        top_k: int or [B] int32/int64; top_p, min_p: float or [B] float tensors; None: off.
        seed, offset: int or int64 tensor [1] or [B]; per_row_seed: seed holds one value per row.
    """
    if num_rows == 0:
        return
    entry, tensors, scalars, smem = _plan(x, rowmap, num_rows, out, valid, logprob, top_k, top_p, min_p,
                                          top_k_first, seed, offset, per_row_seed)
    kernel = cuda.load(SOURCE, entry, device=x.device, flags=entry_flags(entry))  # this entry alone
    kernel.launch((num_rows * cluster_of(entry), 1, 1), (threads_of(entry), 1, 1), SIGNATURE,
                  list(map(_data_ptr, tensors)) + scalars, shared_mem=smem,
                  programmatic=programmatic and PDL and programmatic_ok(x.device))


_data_ptr = torch.Tensor.data_ptr


def entry_flags(entry: str, extra: tuple = ()) -> tuple[str, ...]:
    """The compiler flags that build sample.cu with ``entry`` alone (its #if guards: the front end
    and ptxas then see one entry of eight), after cuda.DEFAULT_FLAGS and ``extra``. Memoised: the
    same tuple object every call (cuda.load's fast path keys on it)."""
    key = (entry, extra)
    f = _entry_flags.get(key)
    if f is None:
        f = _entry_flags[key] = (*cuda.DEFAULT_FLAGS, *extra, "-DMOECOMM_SAMPLE_ONLY", f"-DMOECOMM_SAMPLE_ONLY_{entry}")
    return f


_entry_flags: dict = {}

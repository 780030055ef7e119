"""BatchPrefillWithPagedKVCacheWrapper / BatchPrefillWithRaggedKVCacheWrapper: prefill attention of
ragged queries over a paged (or contiguous ragged) KV, plan() then run().

# B = batch, nnz = query rows of all requests, Hq / Hk = heads, D = head_dim, P = page_size

FlashInfer's class names and plan()/run() arguments. plan() does the host work once per batch:
validates the page table, cuts each request's queries into BLOCK_M tiles (heaviest first), packs a
custom mask into bits, and uploads the metadata with one copy; run() launches one kernel per layer.
The paged wrapper's plan() without a custom mask does that work in one call into compiled C where a
C compiler is here (_plan_host: kernels/attention/plan_host.c); the numpy code is its reference.
Masks: causal (queries at the end of the KV: query i sees keys j <= kv_len - qo_len + i), a
sliding window (window_left), a custom mask (bool per (query, key) of each request, or FlashInfer's
packed bits), combined by "and"; logits soft-cap; sm_scale. CUDA-graph mode (paged wrapper): the
metadata buffer and the grid (Hq, max_num_qo_tokens / BLOCK_M + max_batch programs, the surplus
exiting at once) are fixed at construction, so one captured run() replays for any later plan.
Kernels (PREFILL_KERNEL): "v2" (_triton_prefill_v2, the default) reads each request's K / V tiles
with TMA when plan() finds its pages consecutive in the host page table (pages_consecutive) and
run() finds an NHD cache whose token rows are evenly strided (_tma_ok), else it gathers them as
"v1" (_triton_prefill) does. On sm_90 that TMA path launches the hand-scheduled warp-specialised
Gluon kernel (_gluon_prefill; PREFILL_GLUON, MOECOMM_PREFILL_GLUON=0 turns it off) where its features
cover the call (causal or no mask); Triton's automatic warp specialisation of v2's loop (PREFILL_WS,
MOECOMM_PREFILL_WS) stays off by default. All use the same tiles and metadata, so the choice is made at run().
Not here: in-kernel RoPE (use apply_rope first); block-sparse lives in blocksparse.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .. import _env
from ..errors import MoeCommError, MoeCommTypeError, MoeCommValueError
from ..jit import backend as _backend
from ..jit.launch import cdiv, launch
from ..jit.ops import define_op
from . import _plan_host, reference
from ._common import (
    Staging,
    _pack_custom_mask,
    arange_view,
    check_heads,
    check_indices,
    check_kv_cache,
    check_layout,
    check_page_table,
    const,
    host_ints,
    nhd_strides,
    num_sms,
    outputs,
    pages_consecutive,
    parse_dtype,
    round_up,
)

_OP = "BatchPrefillWithPagedKVCacheWrapper"
_ALIGN = 16
# head_dim -> (BLOCK_M, BLOCK_N, num_warps, num_stages); the benchmark's --sweep overrides it. D128:
# (128, 32, 4, 4) 322.6 TFLOP/s at B8 L4096 causal on an H200 (2026-12-01), (128, 64, 8, 3) 276.9,
# (128, 128, 8, 3) 302.5, (64, 64, 4, 3) 267.6.
PREFILL_CONFIGS: dict[int, tuple[int, int, int, int]] = {64: (128, 64, 4, 3), 128: (128, 32, 4, 4), 256: (64, 32, 8, 2)}
# Which kernel run() launches: "v2" (_triton_prefill_v2: TMA tiles when a request's pages are
# consecutive, else the gather without masks inside kv_len) or "v1" (_triton_prefill, the first;
# kept selectable until the H200 has timed both: benchmarks/bench_attention.py --prefill-kernels).
PREFILL_KERNEL = "v2"
# v2's TMA path: head_dim -> (BLOCK_M, BLOCK_N, num_warps, num_stages), tutorial 06's sm_90 tiles
# (D64 and D256 untimed guesses). BLOCK_M must equal PREFILL_CONFIGS' (plan() cuts the
# tiles before run() knows which path the cache allows). D128 at BLOCK_N 128, 3 stages: K + V
# 2 * 128 * 128 * 2 B = 64 KB a stage, 192 KB + Q's 32 KB of the 227 KB of shared memory.
# H200 sweep, 2026-12-01 (session 8), D128 at B8 L4096 causal, TFLOP/s: (128, 128, 8, 3) 466.8 (the
# default since), (128, 64, 8, 4) 444.3, (128, 64, 8, 3) 429.6, (128, 32, 4, 4) 422.3, (128, 128, 8, 2)
# 374.1, (128, 64, 4, 3) 346.8. Tried and dropped: the unmasked blocks' Q K^T issued one block ahead
# of their softmax (FlashAttention-3's overlap by hand): 249.1 at (128, 64, 8, 3), the loop-carried
# [BM, BN] product stops Triton 3.6 from pipelining the TMA loads.
PREFILL_TMA_CONFIGS: dict[int, tuple[int, int, int, int]] = {64: (128, 64, 4, 3), 128: (128, 128, 8, 3), 256: (64, 32, 8, 2)}
# The TMA path's warp-specialised variant (_triton_prefill_v2's WS: Triton 3.6's Hopper pass makes one
# producer and two consumer warpgroups of the loop): EXPERIMENTAL and off. On the H200 (2026-12-02,
# benchmarks/probe_prefill_ws.py, tests/attention/test_prefill_ws.py's gpu test) its results were
# wrong at every tile shape tried (max error vs cuDNN NaN or ~1e19, where the interpreter runs it
# exactly): Triton 3.6's pass or its lowering, not yet isolated; the one-loop form without the pass
# (8 warps) is right. PREFILL_WS: True / False, or None to read MOECOMM_PREFILL_WS
# (0 / 1, default 0) at each run(). It applies where the TMA path does, without a custom mask, for
# fp16 / bf16 queries whose heads are adjacent (Q through a descriptor) and a head_dim listed here.
# head_dim -> (BLOCK_M, BLOCK_N, num_warps, num_stages): the pass takes num_warps 4 only (12 warps
# come out) and num_stages > 1; 128 x 128 tiles fit 2 stages (180 KB of shared memory, 3: 246 KB).
PREFILL_WS: bool | None = None
PREFILL_WS_CONFIGS: dict[int, tuple[int, int, int, int]] = {128: (128, 128, 4, 2)}
# The TMA path's hand-scheduled warp-specialised Hopper kernel (_gluon_prefill, Gluon: a TMA producer
# warp, two consumer warpgroups of BLOCK_M / 2 rows, FlashAttention-3's intra-warpgroup overlap).
# Where it applies (_gluon_applies: sm_90, fp16 / bf16 Q and cache, a head_dim listed here, causal or
# no mask, no window / soft cap / custom mask, Q's heads adjacent; PREFILL_WS, when switched on, keeps
# its own variant) it replaces v2's TMA loop. H200, 2026-12-02 (session 13,
# benchmarks/probe_prefill_gluon.py, one run, B8 L4096 32/8 heads D128 P16 bf16, x cuDNN 559.0 TFLOP/s):
# persistent (grid = SM count, work items looped) 535.0 TFLOP/s = 0.957x, the default; one program a
# tile 0.857x; + the softmax inside the mask branches (ptxas then keeps P V's wait after it) 0.941x
# persistent, 0.857x not (no gain: the other consumer warpgroup already fills the tensor cores);
# branch + ping-pong 0.948x, + late K 0.945x, 3 stages (one Q slot) 0.926x; v2 0.762x (control again
# 0.767x), FlashInfer 0.7.2 0.864x. Non-causal: branch + persistent 0.947x, one program a tile 0.881x.
# Session 12's kernel (one program a tile, regs 240 / 24): 0.888x. Every variant right against the
# fp32 reference (tests/attention/test_prefill_gluon.py). D64's entry (branch + persistent, the
# combination its GPU test ran) is untimed.
# PREFILL_GLUON: True / False, or None to read MOECOMM_PREFILL_GLUON (0 / 1; unset:
# PREFILL_GLUON_DEFAULT) at each run(). head_dim -> GluonConfig; BLOCK_M must be PREFILL_CONFIGS'.
PREFILL_GLUON: bool | None = None
PREFILL_GLUON_DEFAULT = True


class GluonConfig(NamedTuple):
    block_m: int
    block_n: int
    stages: int          # K / V ring depth (K + V: 2 * BLOCK_N * D * 2 bytes a stage)
    pipe: bool           # Q K^T of block j issued before P V of block j - 1 (FlashAttention-3's overlap)
    pingpong: bool       # the two consumer warpgroups take turns issuing their wgmma (with pipe only)
    late_k_release: bool  # K's slot released with V's, after the softmax (with pipe only)
    consumer_regs: int   # setmaxnreg of the worker consumer warpgroup (the default one gets the rest)
    producer_regs: int   # (the compiler caps the kernel at 65536 / 384 threads -> 168 registers at entry)
    branch_softmax: bool = True  # the whole softmax in the mask / no-mask branches (keeps P V's wait after it)
    persistent: bool = False     # grid = the SM count, each program looping over work items (else one each)


PREFILL_GLUON_CONFIGS: dict[int, GluonConfig] = {
    128: GluonConfig(128, 128, 2, True, False, False, 232, 40, False, True),
    64: GluonConfig(128, 128, 3, True, False, False, 232, 40, True, True),
}



def _prefill_impl(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: torch.Tensor, kv_indices: torch.Tensor,
    mask_bits: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, offsets: list[int], num_tiles_grid: int,
    page_size: int, kv_layout_hnd: bool, causal: bool, custom: bool, write_lse: bool, sm_scale: float,
    logits_soft_cap: float, window_left: int, kv_contiguous: bool = False,
) -> None:
    off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr, off_kv_len, off_mask, batch = offsets
    layout = reference.HND if kv_layout_hnd else reference.NHD
    num_qo_heads, head_dim = q.shape[1], q.shape[2]
    if _backend.choose(q, "attention_prefill") is not _backend.Impl.TRITON:
        m = meta.cpu().long()
        qo_indptr = m[off_qo_indptr:off_qo_indptr + batch + 1]
        indptr = m[off_kv_indptr:off_kv_indptr + batch + 1]
        lengths = m[off_kv_len:off_kv_len + batch]
        npages = indptr[1:] - indptr[:-1]
        last = torch.where(npages > 0, lengths - (npages - 1) * page_size, torch.zeros_like(lengths))
        dense = mask_offs = None
        if custom:
            dense = reference.unpack_mask_bits(mask_bits.cpu(), mask_bits.numel() * 8)
            mask_offs = m[off_mask:off_mask + batch]
        o, s = reference.batch_prefill(q, qo_indptr, k_cache, v_cache, layout, indptr, kv_indices.cpu(), last,
                                       causal=causal, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap or None,
                                       window_left=window_left, custom_mask=dense, mask_indptr=mask_offs)
        out.copy_(o)
        if write_lse:
            lse.copy_(s)
        return
    num_kv_heads = k_cache.shape[1] if kv_layout_hnd else k_cache.shape[2]
    soft = logits_soft_cap > 0
    consts = dict(GROUP=num_qo_heads // num_kv_heads, PAGE=page_size, HEAD_DIM=head_dim, CAUSAL=causal,
                  WINDOW=window_left >= 0, SOFT_CAP=soft, CUSTOM=custom, WRITE_LSE=write_lse,
                  DOT_PRECISION="ieee" if q.dtype is torch.float32 else "tf32")
    block_m, block_n, num_warps, num_stages = PREFILL_CONFIGS[head_dim]
    if PREFILL_KERNEL == "v1":
        from . import _triton_prefill as kern

        kernel = kern.prefill_kernel
    else:
        from . import _triton_prefill_v2 as kern

        kernel = kern.prefill_v2_kernel
        tma = kv_contiguous and not kv_layout_hnd and _tma_ok(k_cache, page_size) and _tma_ok(v_cache, page_size)
        ws = (tma and not custom and head_dim in PREFILL_WS_CONFIGS and q.dtype in (torch.bfloat16, torch.float16)
              and _ws_enabled() and _q_tma_ok(q))
        if tma and not ws and _gluon_enabled() and _gluon_applies(q, k_cache, v_cache, custom, window_left, soft):
            cfg = PREFILL_GLUON_CONFIGS[head_dim]
            if cfg.block_m != block_m:
                raise MoeCommValueError(f"{_OP}: PREFILL_GLUON_CONFIGS[{head_dim}] must have BLOCK_M = {block_m} "
                                        f"(PREFILL_CONFIGS'), got {cfg.block_m}")
            _launch_gluon(q, k_cache, v_cache, out, lse, meta, kv_indices, mask_bits, offsets, num_tiles_grid,
                          page_size, layout, causal, write_lse, sm_scale, cfg)
            return
        if tma:
            name = "PREFILL_WS_CONFIGS" if ws else "PREFILL_TMA_CONFIGS"
            bm, block_n, num_warps, num_stages = (PREFILL_WS_CONFIGS if ws else PREFILL_TMA_CONFIGS)[head_dim]
            if bm != block_m:  # the plan's tiles are PREFILL_CONFIGS' BLOCK_M rows
                raise MoeCommValueError(f"{_OP}: {name}[{head_dim}] must have BLOCK_M = {block_m} "
                                        f"(PREFILL_CONFIGS'), got {bm}")
            _ensure_allocator(q.device)
        consts["KV_TMA"] = tma
        consts["WS"] = ws
    consts.update(BLOCK_M=block_m, BLOCK_N=block_n)
    launch(kernel, (num_qo_heads, num_tiles_grid), (
        q, k_cache, v_cache, out, lse, meta, kv_indices, mask_bits,
        off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr, off_kv_len, off_mask,
        k_cache.shape[0], num_qo_heads,
        q.stride(0), q.stride(1), *nhd_strides(k_cache, layout), *nhd_strides(v_cache, layout),
        out.stride(0), out.stride(1), sm_scale, logits_soft_cap if soft else 1.0, max(window_left, 0),
    ), consts, num_warps, num_stages)


def _tma_ok(t: torch.Tensor, page_size: int) -> bool:
    """An NHD cache [num_pages, P, Hk, D] whose token rows are evenly strided (a page is P rows, the
    heads of a row adjacent) and TMA-addressable (16-byte aligned base and row stride, row ids < 2**31)."""
    es = t.element_size()
    return (t.stride(3) == 1 and t.stride(2) == t.shape[3] and t.stride(0) == page_size * t.stride(1)
            and (t.stride(1) * es) % 16 == 0 and t.data_ptr() % 16 == 0 and t.shape[0] * page_size < 2**31)


def _q_tma_ok(q: torch.Tensor) -> bool:
    """q [nnz, Hq, D] whose heads of a row are adjacent and TMA-addressable: WS reads it as the 2-D
    tensor [nnz, Hq * D] (16-byte aligned base and row stride)."""
    es = q.element_size()
    return (q.stride(2) == 1 and q.stride(1) == q.shape[2] and (q.stride(0) * es) % 16 == 0
            and q.data_ptr() % 16 == 0)


def _gluon_applies(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, custom: bool, window_left: int,
                   soft_cap: bool) -> bool:
    """Whether the Gluon kernel covers this launch (the TMA path already applies): gluon_supports()
    for this GPU and Q readable by TMA."""
    if q.device.type != "cuda" or not _q_tma_ok(q) or not _gluon_importable():
        return False
    return gluon_supports(_device_capability(q.device), q.dtype, k_cache.dtype, v_cache.dtype, q.shape[2], custom,
                          window_left, soft_cap)


def gluon_supports(capability: tuple[int, int], q_dtype: torch.dtype, k_dtype: torch.dtype, v_dtype: torch.dtype,
                   head_dim: int, custom: bool, window_left: int, soft_cap: bool) -> bool:
    """The Gluon kernel's domain: sm_90 (wgmma, setmaxnreg), fp16 / bf16 Q with K / V of the same
    dtype, a head_dim in PREFILL_GLUON_CONFIGS, and only the masks it has (causal or none: no
    window, soft cap or custom mask)."""
    if custom or window_left >= 0 or soft_cap or tuple(capability) != (9, 0):
        return False
    return q_dtype in (torch.bfloat16, torch.float16) and k_dtype == q_dtype and v_dtype == q_dtype \
        and head_dim in PREFILL_GLUON_CONFIGS


_CAPABILITY: dict = {}
_GLUON_IMPORT: list = []


def _gluon_importable() -> bool:
    """Whether _gluon_prefill imports (Triton 3.6's Gluon API; an older Triton has none): asked once."""
    if not _GLUON_IMPORT:
        try:
            from . import _gluon_prefill  # noqa: F401
            _GLUON_IMPORT.append(True)
        except Exception as exc:  # ImportError, or an API that moved: v2 runs, and says why once
            from ..jit.backend import warn_once

            warn_once("prefill-gluon-import", f"moecomm: the Gluon prefill kernel is unavailable ({type(exc).__name__}: "
                      f"{exc}); prefill's TMA path runs v2")
            _GLUON_IMPORT.append(False)
    return _GLUON_IMPORT[0]


def _device_capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(index)
    if cap is None:
        cap = _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return cap


def _gluon_enabled() -> bool:
    """PREFILL_GLUON, or where it is None the MOECOMM_PREFILL_GLUON variable (0 / 1; unset:
    PREFILL_GLUON_DEFAULT)."""
    if PREFILL_GLUON is not None:
        return bool(PREFILL_GLUON)
    value = _env.raw("MOECOMM_PREFILL_GLUON")
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if value is None or not value.strip():
        return PREFILL_GLUON_DEFAULT
    return value.strip().lower() not in ("0", "false", "no", "off")


def _launch_gluon(q, k_cache, v_cache, out, lse, meta, kv_indices, mask_bits, offsets, num_tiles_grid, page_size,
                  layout, causal, write_lse, sm_scale, cfg: GluonConfig) -> None:
    """prefill_v2_kernel's arguments into _gluon_prefill's kernel, with its own constexprs."""
    from . import _gluon_prefill as gk

    off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr, off_kv_len, off_mask, _ = offsets
    num_qo_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    _ensure_allocator(q.device)  # descriptors made in the kernel need a global scratch
    consts = gluon_constexprs(cfg, num_qo_heads // num_kv_heads, page_size, head_dim, q.element_size(), causal, write_lse)
    launch(gk.prefill_gluon_kernel, (gluon_grid(num_qo_heads * num_tiles_grid, cfg, q.device),), (
        q, k_cache, v_cache, out, lse, meta, kv_indices, mask_bits,
        off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr, off_kv_len, off_mask,
        k_cache.shape[0], num_qo_heads,
        q.stride(0), q.stride(1), *nhd_strides(k_cache, layout), *nhd_strides(v_cache, layout),
        out.stride(0), out.stride(1), sm_scale, 1.0, 0,
    ), consts, 4)  # 4 warps: the default partition (a consumer warpgroup); the workers add 5 (12 in all)


_SMEM_LIMIT = 232448  # bytes of shared memory a block may have on sm_90 (227 KB)


def gluon_constexprs(cfg: GluonConfig, group: int, page_size: int, head_dim: int, itemsize: int, causal: bool,
                     write_lse: bool) -> dict:
    """The Gluon kernel's constexprs for cfg. Q_SLOTS: two Q tiles (the next item's loads while this
    one runs) where they fit beside the K / V ring with ~8 KB to spare (the in-kernel descriptors'
    staging, barriers), else one."""
    q_tile = cfg.block_m * head_dim * itemsize
    ring = cfg.stages * 2 * cfg.block_n * head_dim * itemsize
    q_slots = 2 if 2 * q_tile + ring <= _SMEM_LIMIT - 8192 else 1
    return dict(GROUP=group, PAGE=page_size, HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                STAGES=cfg.stages, CAUSAL=causal, WRITE_LSE=write_lse, PIPE=cfg.pipe, PINGPONG=cfg.pingpong,
                LATE_K_RELEASE=cfg.late_k_release, CONSUMER_REGS=cfg.consumer_regs, PRODUCER_REGS=cfg.producer_regs,
                BRANCH_SOFTMAX=cfg.branch_softmax, Q_SLOTS=q_slots)


def gluon_grid(num_items: int, cfg: GluonConfig, device: torch.device) -> int:
    """The Gluon kernel's 1-D grid over num_items = Hq * tiles work items (the kernel reads the real
    tile count from the metadata: CUDA-graph mode's surplus items exit): one program each, or with
    cfg.persistent one per SM (fewer when there are fewer items), each looping over its items."""
    if cfg.persistent:
        return max(1, min(num_items, num_sms(device)))
    return max(1, num_items)


def _ws_enabled() -> bool:
    """PREFILL_WS, or where it is None the MOECOMM_PREFILL_WS variable (0 / 1, default 0)."""
    if PREFILL_WS is not None:
        return bool(PREFILL_WS)
    value = _env.raw("MOECOMM_PREFILL_WS")
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value is not None and value.strip().lower() not in ("", "0", "false", "no", "off")


def _ensure_allocator(device: torch.device) -> None:
    """Tensor descriptors made in the kernel need a small global scratch: give Triton torch's
    allocator (as moecomm.gemm does; the interpreter needs none)."""
    if device.type != "cuda":
        return
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


paged_prefill = define_op("attention_paged_prefill", _prefill_impl, fake=lambda *args: None, mutates_args=("out", "lse"),
                          differentiable=False)


class _PrefillBase:
    _op = _OP

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str, use_cuda_graph: bool, qo_indptr_buf=None,
                 paged_kv_indices_buf=None, max_num_qo_tokens: int | None = None):
        if not isinstance(float_workspace_buffer, torch.Tensor):
            raise MoeCommTypeError(f"{self._op}: float_workspace_buffer must be a torch.Tensor, got "
                                   f"{type(float_workspace_buffer).__name__}")
        self._kv_layout = check_layout(self._op, kv_layout)
        self._device = float_workspace_buffer.device
        self._graph = bool(use_cuda_graph)
        self._plan = None
        self._scalars_key = self._scalars = self._heads_key = None
        self._layouts: dict = {}
        if not self._graph:
            self._staging = Staging(self._device, 1024)
            return
        # CUDA-graph mode: every buffer and the grid fixed here (module docstring)
        if qo_indptr_buf is None or paged_kv_indices_buf is None or max_num_qo_tokens is None:
            raise MoeCommValueError(f"{self._op}: qo_indptr_buf, paged_kv_indices_buf and max_num_qo_tokens must be given "
                                    "with use_cuda_graph=True (they fix the maximum batch, pages and query rows), got None")
        for name, t in (("qo_indptr_buf", qo_indptr_buf), ("paged_kv_indices_buf", paged_kv_indices_buf)):
            if not isinstance(t, torch.Tensor) or t.dtype is not torch.int32 or t.dim() != 1 or not t.is_contiguous():
                raise MoeCommValueError(f"{self._op}: {name} must be a contiguous 1-D int32 tensor, got {t!r:.60}")
        if isinstance(max_num_qo_tokens, bool) or not isinstance(max_num_qo_tokens, int) or max_num_qo_tokens < 1:
            raise MoeCommValueError(f"{self._op}: max_num_qo_tokens must be an int >= 1, got {max_num_qo_tokens!r}")
        self._max_batch = qo_indptr_buf.shape[0] - 1
        self._max_tokens = max_num_qo_tokens
        self._indices_buf = paged_kv_indices_buf
        # tiles of any BLOCK_M >= 16: at most max_tokens / 16 + one partial tile per request
        self._tile_cap = cdiv(max_num_qo_tokens, 16) + self._max_batch
        self._staging = Staging(self._device, self._layout(0, 0)[1])

    def _layout(self, batch: int, num_tiles: int):
        """Offsets of the metadata sections and the end of the fixed part; cached per (batch,
        num_tiles), as plans repeat their sizes (run() only reads the offsets)."""
        hit = self._layouts.get((batch, num_tiles))
        if hit is None:
            if len(self._layouts) > 256:
                self._layouts.clear()
            hit = self._layouts[(batch, num_tiles)] = self._make_layout(batch, num_tiles)
        return hit

    def _make_layout(self, batch: int, num_tiles: int):
        cap_t, cap_b = (self._tile_cap, self._max_batch) if self._graph else (num_tiles, batch)
        ts, bs = round_up(max(cap_t, 1), _ALIGN), round_up(cap_b + 1, _ALIGN)
        off_tile_req, off_tile_q0 = _ALIGN, _ALIGN + ts
        off_qo_indptr = _ALIGN + 2 * ts
        off_kv_indptr, off_kv_len, off_mask = off_qo_indptr + bs, off_qo_indptr + 2 * bs, off_qo_indptr + 3 * bs
        return [off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr, off_kv_len, off_mask], off_qo_indptr + 4 * bs

    def _check_scalars(self, q_data_type, kv_data_type, window_left, logits_soft_cap, sm_scale):
        """plan()'s scalar arguments checked; (q dtype, kv dtype, soft cap)."""
        op = self._op
        q_dtype = parse_dtype(op, "q_data_type", q_data_type)
        kv_dtype = parse_dtype(op, "kv_data_type", kv_data_type, q_dtype)
        if kv_dtype is not q_dtype:
            raise MoeCommTypeError(f"{op}: kv_data_type must equal q_data_type ({str(q_dtype).replace('torch.', '')}), "
                                   f"got {str(kv_dtype).replace('torch.', '')}")
        if isinstance(window_left, bool) or not isinstance(window_left, int) or window_left < -1:
            raise MoeCommValueError(f"{op}: window_left must be an int >= -1, got {window_left!r}")
        cap = 0.0 if logits_soft_cap is None else float(logits_soft_cap)
        if not (cap >= 0 and math.isfinite(cap)):
            raise MoeCommValueError(f"{op}: logits_soft_cap must be None or a finite value >= 0, got {logits_soft_cap!r}")
        if sm_scale is not None and not (float(sm_scale) > 0 and math.isfinite(float(sm_scale))):
            raise MoeCommValueError(f"{op}: sm_scale must be a finite value > 0, got {sm_scale!r}")
        return q_dtype, kv_dtype, cap

    def _plan_core(self, qo_indptr, kv_indptr_np, lengths, indices, num_qo_heads, num_kv_heads, head_dim, page_size,
                   custom_mask, packed_custom_mask, causal, sm_scale, window_left, logits_soft_cap, q_data_type,
                   kv_data_type, max_index, non_blocking, kv_contiguous=False):
        op = self._op
        key = (q_data_type, kv_data_type, window_left, type(window_left), logits_soft_cap, sm_scale)
        if key != self._scalars_key:  # as decode's plan(): checked once per distinct tuple
            self._scalars = self._check_scalars(q_data_type, kv_data_type, window_left, logits_soft_cap, sm_scale)
            self._scalars_key = key
        q_dtype, kv_dtype, cap = self._scalars
        qo_np = host_ints(op, "qo_indptr", qo_indptr)
        batch = lengths.shape[0]
        if qo_np.shape[0] != batch + 1:
            raise MoeCommValueError(f"{op}: qo_indptr must have batch_size + 1 = {batch + 1} entries, got {qo_np.shape[0]}")
        qo_lens = qo_np[1:] - qo_np[:-1]  # (np.diff: ~1.5 us more)
        if qo_np.item(0) != 0 or (batch and np.minimum.reduce(qo_lens) < 0):
            raise MoeCommValueError(f"{op}: qo_indptr must start at 0 and be non-decreasing, got {qo_np.tolist()[:8]}...")
        custom = custom_mask is not None or packed_custom_mask is not None
        if self._graph:
            if custom:
                raise MoeCommValueError(f"{op}: custom_mask must be None with use_cuda_graph=True (its size varies), got a mask")
            if batch > self._max_batch or qo_np.item(-1) > self._max_tokens:
                raise MoeCommValueError(f"{op}: batch size and qo_indptr[-1] must be <= {self._max_batch} and "
                                        f"{self._max_tokens} (the CUDA-graph buffers'), got {batch} and {qo_np.item(-1)}")
        bits = offs = None
        if custom:
            bits, offs = _pack_custom_mask(op, custom_mask, packed_custom_mask, qo_lens, lengths)
        block_m = PREFILL_CONFIGS[head_dim][0]
        dt = qo_lens.dtype  # same-dtype 0-d operands: half the cost of a Python int's (_common.const)
        ntiles = qo_lens + const(block_m - 1, dt)
        ntiles //= const(block_m, dt)
        tile_end = np.add.accumulate(ntiles, dtype=dt)  # [B] one past each request's last tile
        num_tiles = tile_end.item(-1) if batch else 0
        if num_tiles > 65535:
            raise MoeCommValueError(f"{op}: qo_indptr must describe <= 65535 tiles of {block_m} query rows (CUDA's grid "
                                    f"limit), got {num_tiles}; split the batch")
        tile_req = arange_view(batch).repeat(ntiles)  # int64: numpy indexes with intp (an int32 index: +0.8 us)
        if causal and num_tiles:
            # heaviest first: a causal tile reads keys up to its last row, i.e. about its first row's
            # position in the KV (exact but for a request's last, partial tile: within one tile). Each
            # request's tiles are built last first, so that the keys come in ascending runs (timsort
            # merges them: 1.7 us for 256 tiles, 2.3 us for descending runs); ties are only ever between
            # requests, whose order a stable sort keeps: the order is that of sorting tiles built first first.
            tile_q0 = tile_end[tile_req]
            tile_q0 -= arange_view(num_tiles + 1, dt)[1:]  # tile i of a request ending at e: rows (e - 1 - i) * BLOCK_M
            tile_q0 *= const(block_m, dt)
            if batch > 1:  # one request's tiles are in order already
                key = (qo_lens - lengths)[tile_req]
                key -= tile_q0  # ascending: -position
                order = key.argsort(kind="stable")
                tile_req, tile_q0 = tile_req[order], tile_q0[order]
        else:
            tile_q0 = arange_view(num_tiles, dt) - (tile_end - ntiles)[tile_req]
            tile_q0 *= const(block_m, dt)

        (off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr, off_kv_len, off_mask), fixed_end = \
            self._layout(batch, num_tiles)
        dev_indices = None
        num_indices = indices.shape[0]
        if self._graph:
            if num_indices > self._indices_buf.shape[0]:
                raise MoeCommValueError(f"{op}: paged_kv_indices must hold <= {self._indices_buf.shape[0]} ids "
                                        f"(paged_kv_indices_buf's size), got {num_indices}")
            self._indices_buf[:num_indices].copy_(torch.as_tensor(indices).to(torch.int32), non_blocking=non_blocking)
            dev_indices = self._indices_buf
        elif isinstance(indices, torch.Tensor) and indices.device.type != "cpu":
            dev_indices = indices if indices.dtype is torch.int32 and indices.is_contiguous() else indices.to(torch.int32).contiguous()
        need = fixed_end + (0 if dev_indices is not None else num_indices)
        st = self._staging
        st.ensure(need)
        h = st.host_np
        h[0] = num_tiles
        h[off_tile_req:off_tile_req + num_tiles] = tile_req
        h[off_tile_q0:off_tile_q0 + num_tiles] = tile_q0
        h[off_qo_indptr:off_qo_indptr + batch + 1] = qo_np
        h[off_kv_indptr:off_kv_indptr + batch + 1] = kv_indptr_np
        h[off_kv_len:off_kv_len + batch] = lengths
        if custom:
            h[off_mask:off_mask + batch] = offs
        if dev_indices is None:
            h[fixed_end:fixed_end + num_indices] = indices  # the host ids' numpy array (check_indices')
        st.upload(need)
        kv_indices = dev_indices if dev_indices is not None else st.dev_view(fixed_end, fixed_end + max(num_indices, 1))
        mask_t = torch.from_numpy(bits if bits.size else np.zeros(1, np.uint8)).to(self._device, non_blocking=non_blocking) \
            if custom else st.dev_view(0, 1)
        self._plan = {  # a literal: half the cost of dict(**kwargs)
            "batch": batch, "nnz": qo_np.item(-1), "num_qo_heads": num_qo_heads, "num_kv_heads": num_kv_heads,
            "head_dim": head_dim, "page_size": page_size, "q_dtype": q_dtype, "kv_dtype": kv_dtype,
            "causal": bool(causal), "custom": custom,
            "sm_scale": 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale), "soft_cap": cap,
            "window_left": window_left, "offsets": [off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr, off_kv_len,
                                                    off_mask, batch],
            "num_tiles": cdiv(self._max_tokens, block_m) + self._max_batch if self._graph else max(num_tiles, 1),
            "kv_indices": kv_indices, "mask": mask_t, "meta": st.dev, "max_index": max_index,
            "kv_contiguous": kv_contiguous,
        }

    def _run_core(self, q, k, v, page_size, out, lse, return_lse, scale_mul):
        p = self._plan
        op = self._op
        nnz, hq = q.shape[0], p["num_qo_heads"]
        out, lse = outputs(op, q, out, lse, return_lse, nnz, hq)
        op = paged_prefill if torch.compiler.is_compiling() or q.requires_grad else _prefill_impl  # as decode's run()
        op(q, k, v, p["meta"], p["kv_indices"], p["mask"], out, lse if return_lse else out,
                      p["offsets"], p["num_tiles"], page_size, self._kv_layout == reference.HND, p["causal"], p["custom"],
                      return_lse, p["sm_scale"] * scale_mul, p["soft_cap"], p["window_left"], p["kv_contiguous"])
        return (out, lse) if return_lse else out

    def _check_q(self, q):
        p = self._plan
        op = self._op
        if p is None:
            raise MoeCommValueError(f"{op}: run() must follow plan(), got no plan")
        if not isinstance(q, torch.Tensor):
            raise MoeCommTypeError(f"{op}: q must be a torch.Tensor, got {type(q).__name__}")
        want = (p["nnz"], p["num_qo_heads"], p["head_dim"])
        if self._graph and q.dim() == 3 and p["nnz"] <= q.shape[0] <= self._max_tokens:
            want = (q.shape[0],) + want[1:]  # a graph's fixed q buffer: rows past qo_indptr[-1] are left alone
        if tuple(q.shape) != want:
            raise MoeCommValueError(f"{op}: q must have shape [qo_indptr[-1], num_qo_heads, head_dim] = {list(want)} "
                                    f"(as planned), got {list(q.shape)}")
        if q.dtype is not p["q_dtype"]:
            raise MoeCommTypeError(f"{op}: q must have dtype {str(p['q_dtype']).replace('torch.', '')} (planned q_data_type), "
                                   f"got {str(q.dtype).replace('torch.', '')}")
        return q if q.stride(2) == 1 else q.contiguous()


class BatchPrefillWithPagedKVCacheWrapper(_PrefillBase):
    """Prefill attention of ragged queries over a paged KV cache.

    Args:
        float_workspace_buffer: a tensor on the wrapper's device (FlashInfer's workspace; its device is used).
        kv_layout: "NHD" or "HND".
        use_cuda_graph: buffers and grid fixed here: then qo_indptr_buf ([max_batch + 1] int32),
            paged_kv_indices_buf ([max_num_pages] int32, on the device) and max_num_qo_tokens (ours: the
            rows of the q buffer a graph is captured with) must be given; no custom mask in this mode.
        The remaining FlashInfer arguments (paged_kv_indptr_buf, ...) are accepted and unused.

    Example:
        >>> w = BatchPrefillWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device="cuda"))
        >>> w.plan(qo_indptr, kv_indptr, kv_indices, last_page_len, 32, 8, 128, 16, causal=True,
        ...        q_data_type=torch.bfloat16)
        >>> out = w.run(q, (k_cache, v_cache))
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf=None, paged_kv_indptr_buf=None, paged_kv_indices_buf=None,
                 paged_kv_last_page_len_buf=None, custom_mask_buf=None, mask_indptr_buf=None, backend: str = "auto",
                 jit_args=None, *, max_num_qo_tokens: int | None = None):
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, qo_indptr_buf, paged_kv_indices_buf,
                         max_num_qo_tokens)
        self._host_c = _env.host_c()  # plan()'s compiled C path allowed (MOECOMM_HOST_C)
        self._cargs: _plan_host.Args | None = None  # its inputs for the current heads (None: numpy path)

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads: int,
             num_kv_heads: int, head_dim_qk: int, page_size: int, head_dim_vo: int | None = None, custom_mask=None,
             packed_custom_mask=None, causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, sm_scale: float | None = None, window_left: int = -1,
             logits_soft_cap: float | None = None, rope_scale=None, rope_theta=None, q_data_type="float16",
             kv_data_type=None, non_blocking: bool = True, *, num_pages: int | None = None) -> None:
        """Plan prefill attention for one batch.

        Args:
            qo_indptr: [B + 1] (host preferred), request b's queries are rows qo_indptr[b]:qo_indptr[b + 1].
            paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len: the page table (as decode's plan()).
            num_qo_heads, num_kv_heads, head_dim_qk (64/128/256; head_dim_vo must equal it), page_size (1..128).
            custom_mask: bool, request b's [qo_len, kv_len] mask flattened and concatenated; or
                packed_custom_mask: uint8, FlashInfer's packed bits (little-endian, each request byte-aligned).
            causal: queries sit at the end of the KV (module docstring). window_left: keys within this
                many positions before the query (-1: all). logits_soft_cap, sm_scale: as decode.
            q_data_type, kv_data_type: fp16/bf16 (fp32 too). num_pages: range-check host indices here.
        """
        op = self._op
        key = (num_qo_heads, num_kv_heads, head_dim_qk, page_size, head_dim_vo, pos_encoding_mode, type(num_qo_heads),
               type(num_kv_heads), type(head_dim_qk), type(page_size))
        if key != self._heads_key:  # checked once per distinct tuple (as the scalars in _plan_core)
            check_heads(op, num_qo_heads, num_kv_heads, head_dim_qk, page_size)
            if head_dim_vo is not None and head_dim_vo != head_dim_qk:
                raise MoeCommValueError(f"{op}: head_dim_vo must equal head_dim_qk ({head_dim_qk}), got {head_dim_vo}")
            if pos_encoding_mode != "NONE":
                raise MoeCommValueError(f"{op}: pos_encoding_mode must be 'NONE' (rotate q and k with apply_rope first), "
                                        f"got {pos_encoding_mode!r}")
            self._cargs = self._c_args(page_size, head_dim_qk) if self._host_c else None
            self._heads_key = key
        # the host work in compiled C when it is here (_plan_host); what it does not take, or rejects, below
        a = self._cargs
        if a is not None and custom_mask is None and packed_custom_mask is None:
            if a.knobs is not PREFILL_CONFIGS[head_dim_qk]:  # the benchmark's --sweep changed BLOCK_M: new inputs
                a = self._cargs = self._c_args(page_size, head_dim_qk)
            if a is not None and self._plan_c(a, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
                                              num_qo_heads, num_kv_heads, head_dim_qk, page_size, causal, sm_scale,
                                              window_left, logits_soft_cap, q_data_type, kv_data_type, non_blocking,
                                              num_pages):
                return
        indptr_np = host_ints(op, "paged_kv_indptr", paged_kv_indptr)
        last_np = host_ints(op, "paged_kv_last_page_len", paged_kv_last_page_len)
        num_indices = paged_kv_indices.shape[0] if isinstance(paged_kv_indices, torch.Tensor) else len(paged_kv_indices)
        lengths, _ = check_page_table(op, indptr_np, last_np, num_indices, page_size, "paged_kv_indptr")
        max_index, indices_np = check_indices(op, paged_kv_indices, num_pages)
        contiguous = (PREFILL_KERNEL != "v1" and indices_np is not None and not self._graph
                      and self._kv_layout == reference.NHD and pages_consecutive(indptr_np, indices_np))
        self._plan_core(qo_indptr, indptr_np, lengths, paged_kv_indices if indices_np is None else indices_np,
                        num_qo_heads, num_kv_heads, head_dim_qk, page_size, custom_mask, packed_custom_mask, causal,
                        sm_scale, window_left, logits_soft_cap, q_data_type, kv_data_type, max_index, non_blocking,
                        contiguous)

    begin_forward = plan

    def _c_args(self, page_size: int, head_dim: int):
        """The C path's inputs for these (validated) heads, or None without the library."""
        a = _plan_host.prefill_args(page_size, PREFILL_CONFIGS[head_dim][0], self._graph, getattr(self, "_max_batch", 0),
                                    getattr(self, "_max_tokens", 0), getattr(self, "_tile_cap", 0),
                                    self._indices_buf.shape[0] if self._graph else 0, _ALIGN, 65535)
        if a is not None:
            a.knobs = PREFILL_CONFIGS[head_dim]
        return a

    def _plan_c(self, a, qo_indptr, kv_indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                causal, sm_scale, window_left, logits_soft_cap, q_data_type, kv_data_type, non_blocking, num_pages) -> bool:
        """plan() without a custom mask through the C call (_plan_host): True when it planned; False,
        having written nothing, when the numpy path must (an input it does not take, or a check that
        failed: the numpy path raises the error, in its order)."""
        key = (q_data_type, kv_data_type, window_left, type(window_left), logits_soft_cap, sm_scale)
        if key != self._scalars_key:  # as _plan_core, but an error is the numpy path's to raise (after the table's)
            try:
                self._scalars = self._check_scalars(q_data_type, kv_data_type, window_left, logits_soft_cap, sm_scale)
            except MoeCommError:
                return False
            self._scalars_key = key
        q_dtype, kv_dtype, cap = self._scalars
        flags = _plan_host.F_CAUSAL if causal else 0
        if PREFILL_KERNEL != "v1" and not self._graph and self._kv_layout == reference.NHD:
            flags |= _plan_host.F_CONSECUTIVE  # v2's TMA path wants to know
        st = self._staging
        flags = a.tables(kv_indptr, last_page_len, indices, num_pages, st, qo_indptr, flags)
        if flags is None or a.call(st) != _plan_host.OK:
            return False
        num_tiles, max_index, consecutive, need, nnz = a.out(5)
        batch = kv_indptr.shape[0] - 1
        num_indices = indices.shape[0]
        host_ids = flags & _plan_host.F_HOST_IDS
        (off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr, off_kv_len, off_mask), fixed_end = \
            self._layout(batch, num_tiles)
        if self._graph:
            self._indices_buf[:num_indices].copy_(torch.as_tensor(indices).to(torch.int32), non_blocking=non_blocking)
            kv_indices = self._indices_buf
        elif not host_ids:  # ids on the device
            kv_indices = indices if indices.dtype is torch.int32 and indices.is_contiguous() else indices.to(torch.int32).contiguous()
        else:
            kv_indices = None
        st.upload(need)
        if kv_indices is None:
            kv_indices = st.dev_view(fixed_end, fixed_end + max(num_indices, 1))
        self._plan = {  # as _plan_core's
            "batch": batch, "nnz": nnz, "num_qo_heads": num_qo_heads, "num_kv_heads": num_kv_heads,
            "head_dim": head_dim, "page_size": page_size, "q_dtype": q_dtype, "kv_dtype": kv_dtype,
            "causal": bool(causal), "custom": False,
            "sm_scale": 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale), "soft_cap": cap,
            "window_left": window_left, "offsets": [off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr, off_kv_len,
                                                    off_mask, batch],
            "num_tiles": cdiv(self._max_tokens, a.knobs[0]) + self._max_batch if self._graph else max(num_tiles, 1),
            "kv_indices": kv_indices, "mask": st.dev_view(0, 1), "meta": st.dev,
            "max_index": max_index if host_ids else None, "kv_contiguous": bool(consecutive),
        }
        return True

    def run(self, q: torch.Tensor, paged_kv_cache, *, k_scale: float | None = None, v_scale: float | None = None,
            out: torch.Tensor | None = None, lse: torch.Tensor | None = None, return_lse: bool = False):
        """Prefill attention of the planned batch.

        Args:
            q: [nnz, Hq, D] in q_data_type. paged_kv_cache: (k_cache, v_cache) or one [num_pages, 2, ...]
                tensor, in the wrapper's layout. k_scale: multiplies the logits; v_scale: the output.
            out: [nnz, Hq, D] written in place; lse: [nnz, Hq] float32 (with return_lse).
        Returns:
            out, or (out, lse [nnz, Hq] float32, base 2) when return_lse.
        """
        q = self._check_q(q)
        p = self._plan
        k, v = check_kv_cache(self._op, paged_kv_cache, self._kv_layout, p["num_kv_heads"], p["head_dim"],
                              p["page_size"], p["kv_dtype"], q.device)
        if p["max_index"] is not None and p["max_index"] >= k.shape[0]:
            raise MoeCommValueError(f"{self._op}: paged_kv_indices must be < num_pages ({k.shape[0]}, the cache's), "
                                    f"got {p['max_index']}")
        res = self._run_core(q, k, v, p["page_size"], out, lse, return_lse, 1.0 if k_scale is None else float(k_scale))
        if v_scale is not None and float(v_scale) != 1.0:
            (res[0] if return_lse else res).mul_(float(v_scale))
        return res

    forward = run


class BatchPrefillWithRaggedKVCacheWrapper(_PrefillBase):
    """Prefill attention over contiguous ragged K / V ([nnz_kv, Hk, D], request b's keys at rows
    kv_indptr[b]:kv_indptr[b + 1]): the paged kernel with one-token pages over the rows."""

    _op = "BatchPrefillWithRaggedKVCacheWrapper"

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf=None, kv_indptr_buf=None, custom_mask_buf=None, mask_indptr_buf=None,
                 backend: str = "auto", jit_args=None):
        if use_cuda_graph:
            raise MoeCommValueError(f"{self._op}: use_cuda_graph must be False (the paged prefill wrapper has a graph "
                                    "mode), got True")
        super().__init__(float_workspace_buffer, kv_layout, False)
        if self._kv_layout != reference.NHD:
            raise MoeCommValueError(f"{self._op}: kv_layout must be 'NHD' for ragged K / V [nnz_kv, Hk, D], got {kv_layout!r}")

    def plan(self, qo_indptr, kv_indptr, num_qo_heads: int, num_kv_heads: int, head_dim_qk: int,
             head_dim_vo: int | None = None, custom_mask=None, packed_custom_mask=None, causal: bool = False,
             pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False, window_left: int = -1,
             logits_soft_cap: float | None = None, sm_scale: float | None = None, rope_scale=None, rope_theta=None,
             q_data_type="float16", kv_data_type=None, non_blocking: bool = True) -> None:
        """As the paged plan(), with kv_indptr [B + 1] over the rows of K / V instead of a page table."""
        op = self._op
        check_heads(op, num_qo_heads, num_kv_heads, head_dim_qk, 1)
        if head_dim_vo is not None and head_dim_vo != head_dim_qk:
            raise MoeCommValueError(f"{op}: head_dim_vo must equal head_dim_qk ({head_dim_qk}), got {head_dim_vo}")
        if pos_encoding_mode != "NONE":
            raise MoeCommValueError(f"{op}: pos_encoding_mode must be 'NONE', got {pos_encoding_mode!r}")
        kv_np = host_ints(op, "kv_indptr", kv_indptr)
        lengths, _ = check_page_table(op, kv_np, np.ones(max(kv_np.shape[0] - 1, 0), kv_np.dtype),
                                      int(kv_np[-1]) if kv_np.size else 0, 1, "kv_indptr")
        nnz_kv = int(kv_np[-1])
        indices = self._row_ids(max(nnz_kv, 1))
        self._plan_core(qo_indptr, kv_np, lengths, indices, num_qo_heads, num_kv_heads, head_dim_qk, 1, custom_mask,
                        packed_custom_mask, causal, sm_scale, window_left, logits_soft_cap, q_data_type, kv_data_type,
                        nnz_kv - 1, non_blocking, True)  # one-token pages 0, 1, 2, ...: consecutive
        self._plan["nnz_kv"] = nnz_kv

    begin_forward = plan

    def _row_ids(self, n: int):
        """0..n-1 as the page ids of one-token pages: a slice of a cached arange (no kernel per plan);
        a device tensor on the GPU, a numpy array on CPU (copied into the staging buffer there)."""
        ids = getattr(self, "_ids", None)
        if ids is None or ids.shape[0] < n:
            cap = max(2 * n, 4096)
            ids = self._ids = (torch.arange(cap, dtype=torch.int32, device=self._device) if self._device.type == "cuda"
                               else np.arange(cap, dtype=np.int32))
        return ids[:n]

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = False):
        """q: [nnz, Hq, D]; k, v: [nnz_kv, Hk, D] (D contiguous). Returns out (and the LSE)."""
        q = self._check_q(q)
        p = self._plan
        k4 = k.unsqueeze(1) if isinstance(k, torch.Tensor) and k.dim() == 3 else k
        v4 = v.unsqueeze(1) if isinstance(v, torch.Tensor) and v.dim() == 3 else v
        k4, v4 = check_kv_cache(self._op, (k4, v4), reference.NHD, p["num_kv_heads"], p["head_dim"], 1, p["kv_dtype"],
                                q.device)
        if k4.shape[0] < p["nnz_kv"]:
            raise MoeCommValueError(f"{self._op}: k must have >= kv_indptr[-1] = {p['nnz_kv']} rows, got {k4.shape[0]}")
        return self._run_core(q, k4, v4, 1, out, lse, return_lse, 1.0)

    forward = run

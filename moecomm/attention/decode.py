"""BatchDecodeWithPagedKVCacheWrapper: decode attention over a paged KV cache, plan() then run().

# B = batch, Hq / Hk = query / KV heads, G = Hq // Hk, D = head_dim, P = page_size, W = work items

Class name and plan()/run() arguments follow FlashInfer's, so that callers switch by changing an
import. plan() runs once per batch on the host (numpy over the host copies of indptr and
last_page_len, then ONE non-blocking copy of one pinned int32 buffer); every layer's run() reuses
it and does no host sync. Where a C compiler is here, plan()'s page-table work is one call into
compiled C instead (_plan_host: kernels/attention/plan_host.c, ~3x less host time); the numpy code
stays its reference, its fallback, and the one place of its error messages.

Split-KV (flash-decoding) is decided in plan(): when B * Hk programs would not fill the GPU
(_TARGET_PROGRAMS_PER_SM programs per SM), each request's KV is cut into equal chunks (multiples
of the kernel's BLOCK_N) so that the work items number about that many; their partial outputs are
merged by LSE in a second kernel. Otherwise each request is one work item and the decode kernel
writes the output itself.

CUDA-graph mode (use_cuda_graph=True): every buffer is allocated at construction for a fixed
maximum batch (the size of paged_kv_indptr_buffer - 1) and page count (of paged_kv_indices_buffer);
the kernels' grids depend only on those and on the head counts, never on a plan's data, and the
split path always runs, so one captured run() replays correctly after any later plan() of at most
that batch. run() then does no allocation when given out= (and lse=).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import _env
from ..errors import MoeCommTypeError, MoeCommValueError
from ..jit import backend as _backend
from ..jit.launch import cdiv, launch
from ..jit.ops import define_op
from . import _plan_host, reference
from ._common import (
    FP8_DTYPES,
    Staging,
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
    parse_dtype,
    round_up,
)

_OP = "BatchDecodeWithPagedKVCacheWrapper"
_TARGET_PROGRAMS_PER_SM = 8  # resident ~2 per SM (96 KB of pipelined K/V each): ~4 waves, small tail
_SPLIT_BELOW_PER_SM = 4  # split only when B * Hk programs are fewer than this per SM (~2 waves)
_MIN_CHUNK = 256  # tokens: below this a chunk's partial (Hq x D fp32) costs more than its KV read
_ALIGN = 16  # metadata sections start at multiples of 16 ints (one Triton specialisation of offsets)

HEADS_FIRST = True  # grid order (see _triton_decode); the benchmark's --sweep tries both
_MAX_GRID = 65535  # CUDA's limit on grid dimensions 1 and 2: more work items loop inside the programs
# (head_dim) -> (BLOCK_N, num_warps, num_stages); the benchmark's --sweep overrides it. D128: the
# sweep on an H200 (2026-12-01, bench_attention --sweep) gave (128, 4, 2) 4013 / 4137 / 3905 GB/s at
# the three shapes, the only one above all three targets ((64, 4, 3): 3752 / 4141 / 4031).
DECODE_CONFIGS: dict[int, tuple[int, int, int]] = {64: (64, 4, 3), 128: (128, 4, 2), 256: (32, 4, 3)}



def _decode_impl(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: torch.Tensor, kv_indices: torch.Tensor,
    part_o: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    offsets: list[int], num_programs: int, page_size: int, kv_layout_hnd: bool, direct: bool, write_lse: bool,
    sm_scale: float, logits_soft_cap: float, window_left: int,
) -> None:
    off_req, off_chunk, off_work_indptr, off_kv_indptr, off_len = offsets
    batch, num_qo_heads, head_dim = q.shape
    kv_layout = reference.HND if kv_layout_hnd else reference.NHD
    if _backend.choose(q, "attention_decode") is not _backend.Impl.TRITON:
        m = meta.cpu().long()
        indptr = m[off_kv_indptr:off_kv_indptr + batch + 1]
        lengths = m[off_len:off_len + batch]
        npages = indptr[1:] - indptr[:-1]
        last = torch.where(npages > 0, lengths - (npages - 1) * page_size, torch.zeros_like(lengths))
        o, s = reference.batch_decode(q, k_cache, v_cache, kv_layout, indptr, kv_indices.cpu(), last, sm_scale=sm_scale,
                                      logits_soft_cap=logits_soft_cap or None, window_left=window_left)
        out.copy_(o)
        if write_lse:
            lse.copy_(s)
        return
    from . import _triton_decode as kern

    num_kv_heads = k_cache.shape[2] if not kv_layout_hnd else k_cache.shape[1]
    group = num_qo_heads // num_kv_heads
    block_n, num_warps, num_stages = DECODE_CONFIGS[head_dim]
    skp, skt, skh = nhd_strides(k_cache, kv_layout)
    svp, svt, svh = nhd_strides(v_cache, kv_layout)
    soft = logits_soft_cap > 0
    grid = (num_kv_heads, num_programs) if HEADS_FIRST else (num_programs, num_kv_heads)
    launch(kern.decode_kernel, grid, (
        q, k_cache, v_cache, out, lse, part_o, part_lse, meta, kv_indices,
        off_req, off_chunk, off_work_indptr, off_kv_indptr, off_len, k_cache.shape[0], num_programs,
        window_left if window_left >= 0 else 1 << 30,
        q.stride(0), q.stride(1), skp, skt, skh, svp, svt, svh, out.stride(0), out.stride(1),
        sm_scale, logits_soft_cap if soft else 1.0,
    ), dict(GROUP=group, PAGE=page_size, HEAD_DIM=head_dim, BLOCK_G=max(16, 1 << (group - 1).bit_length()),
            BLOCK_N=block_n, DIRECT=direct, WRITE_LSE=write_lse, SOFT_CAP=soft,
            DOT_PRECISION="ieee" if q.dtype is torch.float32 else "tf32", HEADS_FIRST=HEADS_FIRST), num_warps, num_stages)
    if not direct:
        launch(kern.merge_partials_kernel, (batch, num_qo_heads), (
            part_o, part_lse, meta, out, lse, off_work_indptr, num_qo_heads, out.stride(0), out.stride(1),
        ), dict(HEAD_DIM=head_dim, WRITE_LSE=write_lse), 4 if head_dim >= 128 else 2)


paged_decode = define_op("attention_paged_decode", _decode_impl, fake=lambda *args: None,
                         mutates_args=("part_o", "part_lse", "out", "lse"), differentiable=False)


class BatchDecodeWithPagedKVCacheWrapper:
    """Decode attention (one query token per request) over a paged KV cache.

    Args:
        float_workspace_buffer: uint8 tensor on the GPU (FlashInfer's: 128 MB is plenty), holding the
            split-KV partial outputs; its device is the wrapper's.
        kv_layout: "NHD" (pages [num_pages, P, Hk, D]) or "HND" ([num_pages, Hk, P, D]).
        use_cuda_graph: fixed-size buffers allocated here; then paged_kv_indptr_buffer ([max_batch + 1]
            int32) and paged_kv_indices_buffer ([max_num_pages] int32) must be given, on the device.
        use_tensor_cores, backend: accepted for FlashInfer compatibility (the kernel always uses tl.dot).
        paged_kv_last_page_len_buffer: accepted (FlashInfer's); plan() needs only its host copy.

    Example:
        >>> w = BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device="cuda"))
        >>> w.plan(indptr, indices, last_page_len, 32, 8, 128, 16, q_data_type=torch.bfloat16)
        >>> out = w.run(q, (k_cache, v_cache))           # every layer, same plan
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 use_tensor_cores: bool = False, paged_kv_indptr_buffer: torch.Tensor | None = None,
                 paged_kv_indices_buffer: torch.Tensor | None = None,
                 paged_kv_last_page_len_buffer: torch.Tensor | None = None, backend: str = "auto",
                 jit_args=None):
        if not isinstance(float_workspace_buffer, torch.Tensor):
            raise MoeCommTypeError(f"{_OP}: float_workspace_buffer must be a torch.Tensor, got {type(float_workspace_buffer).__name__}")
        self._kv_layout = check_layout(_OP, kv_layout)
        self._device = float_workspace_buffer.device
        self._workspace = float_workspace_buffer.view(torch.uint8).reshape(-1)
        self._sms = num_sms(self._device)
        self._graph = bool(use_cuda_graph)
        self._indices_buf = None
        if self._graph:
            if paged_kv_indptr_buffer is None or paged_kv_indices_buffer is None:
                raise MoeCommValueError(f"{_OP}: paged_kv_indptr_buffer and paged_kv_indices_buffer must be given with "
                                        "use_cuda_graph=True (they fix the maximum batch and page count), got None")
            for name, t in (("paged_kv_indptr_buffer", paged_kv_indptr_buffer), ("paged_kv_indices_buffer", paged_kv_indices_buffer)):
                if t.dtype is not torch.int32 or t.dim() != 1 or not t.is_contiguous():
                    raise MoeCommValueError(f"{_OP}: {name} must be a contiguous 1-D int32 tensor, got "
                                            f"{str(t.dtype).replace('torch.', '')} of shape {list(t.shape)}")
            self._max_batch = paged_kv_indptr_buffer.shape[0] - 1
            self._indices_buf = paged_kv_indices_buffer
            self._max_work = self._max_batch + _TARGET_PROGRAMS_PER_SM * self._sms
        else:
            self._max_batch, self._max_work = 0, 0
        self._plan = None
        self._views: dict = {}
        self._scalars_key = self._scalars = None
        self._host_c = _env.host_c()  # plan()'s compiled C path allowed (MOECOMM_HOST_C)
        self._cargs: _plan_host.Args | None = None  # its inputs for the current scalars (None: numpy path)
        self._layouts: dict = {}
        # graph mode: the metadata buffer's final size now, so that no plan() ever moves it
        self._staging = Staging(self._device, self._layout(self._max_batch, self._max_work)[1] if self._graph else 1024)

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._graph

    def _layout(self, batch: int, num_work: int) -> tuple[list[int], int]:
        """Offsets of the metadata sections (work_req, then per request: chunk, work_indptr,
        kv_indptr, kv_len) and the end of the fixed part; cached per (batch, num_work), as plans
        repeat their sizes (run() only reads the offsets)."""
        hit = self._layouts.get((batch, num_work))
        if hit is None:
            if len(self._layouts) > 256:
                self._layouts.clear()
            hit = self._layouts[(batch, num_work)] = self._make_layout(batch, num_work)
        return hit

    def _make_layout(self, batch: int, num_work: int) -> tuple[list[int], int]:
        wcap, bcap = (self._max_work, self._max_batch) if self._graph else (num_work, batch)
        ws, bs = round_up(max(wcap, 1), _ALIGN), round_up(bcap + 1, _ALIGN)
        off_req = _ALIGN
        off_chunk = off_req + ws
        off_work_indptr, off_kv_indptr, off_len = off_chunk + bs, off_chunk + 2 * bs, off_chunk + 3 * bs
        return [off_req, off_chunk, off_work_indptr, off_kv_indptr, off_len], off_chunk + 4 * bs

    def _partials(self, num_qo_heads: int, head_dim: int):
        key = (num_qo_heads, head_dim)
        hit = self._views.get(key)
        if hit is None:
            cap = self._workspace.numel() // (num_qo_heads * (head_dim + 1) * 4)
            ws = self._workspace[: cap * num_qo_heads * (head_dim + 1) * 4]
            part_o = ws[: cap * num_qo_heads * head_dim * 4].view(torch.float32)
            part_lse = ws[cap * num_qo_heads * head_dim * 4:].view(torch.float32)
            hit = self._views[key] = (cap, part_o, part_lse)
        return hit

    @staticmethod
    def _check_scalars(num_qo_heads, num_kv_heads, head_dim, page_size, pos_encoding_mode, window_left,
                       logits_soft_cap, q_data_type, kv_data_type, data_type, sm_scale):
        """plan()'s scalar arguments checked; (q dtype, kv dtype, soft cap, sm_scale)."""
        check_heads(_OP, num_qo_heads, num_kv_heads, head_dim, page_size)
        if pos_encoding_mode != "NONE":
            raise MoeCommValueError(f"{_OP}: pos_encoding_mode must be 'NONE' (rotate q and k with apply_rope first), "
                                    f"got {pos_encoding_mode!r}")
        if data_type is not None:
            q_data_type = kv_data_type = data_type
        q_dtype = parse_dtype(_OP, "q_data_type", q_data_type)
        kv_dtype = parse_dtype(_OP, "kv_data_type", kv_data_type, q_dtype, fp8=True)
        fp8_ok = kv_dtype in FP8_DTYPES and q_dtype in (torch.float16, torch.bfloat16)
        if kv_dtype is not q_dtype and not fp8_ok:
            raise MoeCommTypeError(f"{_OP}: kv_data_type must equal q_data_type ({str(q_dtype).replace('torch.', '')}) or be "
                                   f"fp8 with fp16/bf16 queries, got {str(kv_dtype).replace('torch.', '')}")
        if isinstance(window_left, bool) or not isinstance(window_left, int) or window_left < -1:
            raise MoeCommValueError(f"{_OP}: window_left must be an int >= -1, got {window_left!r}")
        cap = 0.0 if logits_soft_cap is None else float(logits_soft_cap)
        if not (cap >= 0 and math.isfinite(cap)):
            raise MoeCommValueError(f"{_OP}: logits_soft_cap must be None or a finite value >= 0, got {logits_soft_cap!r}")
        scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
        if not (scale > 0 and math.isfinite(scale)):
            raise MoeCommValueError(f"{_OP}: sm_scale must be a finite value > 0, got {sm_scale!r}")
        return q_dtype, kv_dtype, cap, scale

    def plan(self, indptr, indices, last_page_len, num_qo_heads: int, num_kv_heads: int, head_dim: int,
             page_size: int, pos_encoding_mode: str = "NONE", window_left: int = -1, logits_soft_cap: float | None = None,
             q_data_type="float16", kv_data_type=None, data_type=None, sm_scale: float | None = None,
             rope_scale=None, rope_theta=None, non_blocking: bool = True, *, num_pages: int | None = None,
             disable_split_kv: bool = False, kv_chunk_size: int | None = None) -> None:
        """Plan decode attention for one batch; reused by every run() until the next plan().

        Args:
            indptr: [B + 1] int32/int64 (host preferred: a device tensor is copied, a sync), request b's
                pages are indices[indptr[b]:indptr[b + 1]].
            indices: [>= indptr[-1]] int32/int64 page ids (host or device; host ids are range-checked,
                device ids are clamped to the cache by the kernel).
            last_page_len: [B] int32/int64, tokens in each request's last page, 1..page_size.
            num_qo_heads, num_kv_heads: Hq, Hk (Hq % Hk == 0: MHA, GQA, MQA).
            head_dim: D, 64, 128 or 256. page_size: P, 1..128.
            pos_encoding_mode: "NONE" (apply RoPE before with apply_rope / apply_rope_inplace).
            window_left: attend to the last window_left + 1 tokens (-1: all).
            logits_soft_cap: c > 0: logits = c * tanh(logits / c); None or 0: none.
            q_data_type, kv_data_type (default q's), data_type (FlashInfer's alias of both): fp16/bf16 (fp32 too);
                kv_data_type may be float8_e4m3fn / float8_e5m2 with fp16/bf16 queries (widened in the kernel;
                pass run()'s k_scale / v_scale for a scaled cache).
            sm_scale: the logits' scale, default 1 / sqrt(D).
            num_pages: the cache's page count, for a range check of host indices here (else at run()).
            disable_split_kv: one work item per request. kv_chunk_size: force split chunks of this
                many tokens (tests; rounded up to the kernel's block).
        """
        # the scalar arguments repeat from plan to plan: validated once per distinct tuple (the types
        # are in the key so that True never passes as a cached 1)
        key = (num_qo_heads, num_kv_heads, head_dim, page_size, window_left, type(num_qo_heads), type(num_kv_heads),
               type(head_dim), type(page_size), type(window_left), pos_encoding_mode, logits_soft_cap, q_data_type,
               kv_data_type, data_type, sm_scale, not disable_split_kv, kv_chunk_size, type(kv_chunk_size))
        if key != self._scalars_key:
            self._scalars = self._check_scalars(num_qo_heads, num_kv_heads, head_dim, page_size, pos_encoding_mode,
                                                window_left, logits_soft_cap, q_data_type, kv_data_type, data_type,
                                                sm_scale)
            self._cargs = self._c_args(num_qo_heads, num_kv_heads, head_dim, page_size, window_left, disable_split_kv,
                                       kv_chunk_size) if self._host_c else None
            self._scalars_key = key
        q_dtype, kv_dtype, cap, scale = self._scalars
        # the host work in compiled C when it is here (_plan_host); what it does not take, or rejects, below
        a = self._cargs
        if a is not None and a.knobs == (DECODE_CONFIGS[head_dim], _TARGET_PROGRAMS_PER_SM, _SPLIT_BELOW_PER_SM):
            if self._plan_c(a, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                            window_left, q_dtype, kv_dtype, cap, scale, non_blocking, num_pages):
                return
        elif a is not None:  # the benchmark's --sweep changed a tuning knob: new inputs, from the next plan on
            self._scalars_key = None

        indptr_np = host_ints(_OP, "indptr", indptr)
        last_np = host_ints(_OP, "last_page_len", last_page_len)
        num_indices = indices.shape[0] if isinstance(indices, torch.Tensor) else len(indices)
        lengths, full = check_page_table(_OP, indptr_np, last_np, num_indices, page_size)
        max_index, indices_np = check_indices(_OP, indices, num_pages)
        batch = lengths.shape[0]
        if self._graph and batch > self._max_batch:
            raise MoeCommValueError(f"{_OP}: batch size must be <= {self._max_batch} (the CUDA-graph buffers' size), got {batch}")
        if self._graph and indptr_np.item(-1) > self._indices_buf.shape[0]:
            raise MoeCommValueError(f"{_OP}: indptr[-1] must be <= {self._indices_buf.shape[0]} (paged_kv_indices_buffer's "
                                    f"size), got {indptr_np.item(-1)}")

        block_n = DECODE_CONFIGS[head_dim][0]
        cap_work, part_o, part_lse = self._partials(num_qo_heads, head_dim)
        max_work = min(cap_work, self._max_work) if self._graph else cap_work
        if self._graph and max_work < batch:
            raise MoeCommValueError(f"{_OP}: float_workspace_buffer must hold {batch} x {num_qo_heads} x {head_dim + 1} "
                                    f"fp32 partials, got {self._workspace.numel()} bytes")
        target = cdiv(_TARGET_PROGRAMS_PER_SM * self._sms, num_kv_heads)
        split = not disable_split_kv and batch > 0 and (
            kv_chunk_size is not None or self._graph or batch * num_kv_heads < _SPLIT_BELOW_PER_SM * self._sms)
        nsplit = None
        num_work = batch
        if split:
            span = lengths if window_left < 0 else np.minimum(lengths, window_left + 1)
            if kv_chunk_size is not None:
                chunk = round_up(max(int(kv_chunk_size), 1), block_n)
            else:
                want = max(1, min(target, max_work - batch))
                chunk = round_up(max(_MIN_CHUNK, cdiv(int(np.add.reduce(span)), want)), block_n)
            dt = span.dtype  # same-dtype 0-d operands: half the cost of a Python int's (_common.const)
            nsplit = span + const(chunk - 1, dt)
            nsplit //= const(chunk, dt)
            if not full:  # a request without KV is one work item too (every length >= 1 otherwise)
                np.maximum(nsplit, 1, out=nsplit)
            work_end = np.add.accumulate(nsplit, dtype=dt)  # [B] one past each request's last item
            num_work = work_end.item(-1)
            if num_work > max_work:  # a forced chunk size past the workspace: one item per request
                if self._graph:
                    raise MoeCommValueError(f"{_OP}: kv_chunk_size must give <= {max_work} work items, got {num_work}")
                split, num_work = False, batch
        direct = not split and not self._graph

        offsets, fixed_end = self._layout(batch, num_work)
        off_req, off_chunk, off_work_indptr, off_kv_indptr, off_len = offsets
        dev_indices = None
        if indices_np is None and not self._graph:  # ids on the device
            dev_indices = indices if indices.dtype is torch.int32 and indices.is_contiguous() else indices.to(torch.int32).contiguous()
        need = fixed_end + (0 if dev_indices is not None or self._graph else num_indices)
        st = self._staging
        st.ensure(need)
        h = st.host_np
        h[0] = num_work
        h[off_kv_indptr:off_kv_indptr + batch + 1] = indptr_np
        h[off_len:off_len + batch] = lengths
        if split:
            # each request's chunk length: the kernel's, from its item count (_triton_decode docstring)
            h[off_work_indptr] = 0
            h[off_work_indptr + 1:off_work_indptr + batch + 1] = work_end
            h[off_req:off_req + num_work] = arange_view(batch, nsplit.dtype).repeat(nsplit)
        elif self._graph:  # graph mode always takes the split path: one chunk per request
            h[off_work_indptr:off_work_indptr + batch + 1] = arange_view(batch + 1)
            h[off_req:off_req + num_work] = arange_view(batch)
        if self._graph and batch < self._max_batch:  # rows a graph captured at a larger batch merges: none
            h[off_work_indptr + batch + 1:off_work_indptr + self._max_batch + 1] = num_work
        if self._graph:
            self._indices_buf[:num_indices].copy_(torch.as_tensor(indices).to(torch.int32), non_blocking=non_blocking)
            kv_indices = self._indices_buf
        elif dev_indices is None:
            h[fixed_end:fixed_end + num_indices] = indices_np
            kv_indices = None  # a view of the staging buffer, made below
        else:
            kv_indices = dev_indices
        st.upload(need)
        if kv_indices is None:
            kv_indices = st.dev_view(fixed_end, fixed_end + max(num_indices, 1))
        if self._graph:
            num_programs = min(max(self._max_batch, target), _MAX_GRID)
        else:
            num_programs = min(max(num_work, 1), _MAX_GRID)
        self._plan = {  # a literal: half the cost of dict(**kwargs)
            "batch": batch, "num_qo_heads": num_qo_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
            "page_size": page_size, "q_dtype": q_dtype, "kv_dtype": kv_dtype, "sm_scale": scale, "soft_cap": cap,
            "window_left": window_left, "offsets": offsets, "num_programs": num_programs, "direct": direct,
            "kv_indices": kv_indices, "num_work": num_work, "part_o": part_o, "part_lse": part_lse,
            "max_index": max_index, "meta": st.dev,
        }

    begin_forward = plan

    def _c_args(self, num_qo_heads, num_kv_heads, head_dim, page_size, window_left, disable_split_kv, kv_chunk_size):
        """The C path's inputs for these (validated) scalars, or None where it does not take them."""
        cap_work, part_o, part_lse = self._partials(num_qo_heads, head_dim)
        target = cdiv(_TARGET_PROGRAMS_PER_SM * self._sms, num_kv_heads)
        a = _plan_host.decode_args(
            page_size, window_left, DECODE_CONFIGS[head_dim][0], target, _SPLIT_BELOW_PER_SM * self._sms, num_kv_heads,
            disable_split_kv, kv_chunk_size, self._graph, self._max_batch,
            min(cap_work, self._max_work) if self._graph else cap_work, self._max_work,
            self._indices_buf.shape[0] if self._graph else 0, _ALIGN, _MIN_CHUNK)
        if a is not None:
            a.knobs = (DECODE_CONFIGS[head_dim], _TARGET_PROGRAMS_PER_SM, _SPLIT_BELOW_PER_SM)
            a.extra = (part_o, part_lse, min(max(self._max_batch, target), _MAX_GRID))  # + graph mode's grid
        return a

    def _plan_c(self, a, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, window_left,
                q_dtype, kv_dtype, cap, scale, non_blocking, num_pages) -> bool:
        """plan() through the C call (_plan_host): True when it planned; False, having written nothing,
        when the numpy path must (an input it does not take, or a check that failed: the numpy path
        raises the error)."""
        st = self._staging
        flags = a.tables(indptr, last_page_len, indices, num_pages, st)
        if flags is None or a.call(st) != _plan_host.OK:
            return False
        num_work, split, max_index, need = a.out(4)
        batch = indptr.shape[0] - 1
        num_indices = indices.shape[0]
        host_ids = flags & _plan_host.F_HOST_IDS
        offsets, fixed_end = self._layout(batch, num_work)
        if self._graph:
            self._indices_buf[:num_indices].copy_(torch.as_tensor(indices).to(torch.int32), non_blocking=non_blocking)
            kv_indices = self._indices_buf
            num_programs = a.extra[2]
        else:
            if host_ids:
                kv_indices = None
            else:  # ids on the device
                kv_indices = indices if indices.dtype is torch.int32 and indices.is_contiguous() else indices.to(torch.int32).contiguous()
            num_programs = min(max(num_work, 1), _MAX_GRID)
        st.upload(need)
        if kv_indices is None:
            kv_indices = st.dev_view(fixed_end, fixed_end + max(num_indices, 1))
        self._plan = {  # as plan()'s numpy path
            "batch": batch, "num_qo_heads": num_qo_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
            "page_size": page_size, "q_dtype": q_dtype, "kv_dtype": kv_dtype, "sm_scale": scale, "soft_cap": cap,
            "window_left": window_left, "offsets": offsets, "num_programs": num_programs,
            "direct": not split and not self._graph, "kv_indices": kv_indices, "num_work": num_work,
            "part_o": a.extra[0], "part_lse": a.extra[1],
            "max_index": max_index if host_ids else None, "meta": st.dev,
        }
        return True

    def run(self, q: torch.Tensor, paged_kv_cache, *, q_scale: float | None = None, k_scale: float | None = None,
            v_scale: float | None = None, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
            return_lse: bool = False):
        """Decode attention of the planned batch.

        Args:
            q: [B, Hq, D] in q_data_type, one query token per request (any strides with D contiguous).
            paged_kv_cache: (k_cache, v_cache), each [num_pages, P, Hk, D] (NHD) or [num_pages, Hk, P, D]
                (HND), or one tensor [num_pages, 2, ...] of both; head_dim contiguous.
            q_scale, k_scale: multiply the logits (fp8 dequantisation scales). v_scale: multiplies the output.
            out: [B, Hq, D] in q's dtype, written in place (required for a run() without allocation).
            lse: [B, Hq] float32, written when return_lse.
            return_lse: also return the LSE (base 2, as FlashInfer).

        Returns:
            out [B, Hq, D], or (out, lse [B, Hq] float32) when return_lse (FlashInfer's convention).
        """
        p = self._plan
        if p is None:
            raise MoeCommValueError(f"{_OP}: run() must follow plan(), got no plan")
        if not isinstance(q, torch.Tensor):
            raise MoeCommTypeError(f"{_OP}: q must be a torch.Tensor, got {type(q).__name__}")
        batch, hq, hd = p["batch"], p["num_qo_heads"], p["head_dim"]
        if q.dim() != 3 or q.shape[0] != batch or q.shape[1] != hq or q.shape[2] != hd:
            raise MoeCommValueError(f"{_OP}: q must have shape [batch, num_qo_heads, head_dim] = [{batch}, {hq}, {hd}] "
                                    f"(as planned), got {list(q.shape)}")
        if q.dtype is not p["q_dtype"]:
            raise MoeCommTypeError(f"{_OP}: q must have dtype {str(p['q_dtype']).replace('torch.', '')} (planned "
                                   f"q_data_type), got {str(q.dtype).replace('torch.', '')}")
        if q.stride(2) != 1:
            q = q.contiguous()
        k, v = check_kv_cache(_OP, paged_kv_cache, self._kv_layout, p["num_kv_heads"], hd, p["page_size"],
                              p["kv_dtype"], q.device)
        if p["max_index"] is not None and p["max_index"] >= k.shape[0]:
            raise MoeCommValueError(f"{_OP}: indices must be < num_pages ({k.shape[0]}, the cache's), got {p['max_index']}")
        out, lse = outputs(_OP, q, out, lse, return_lse, batch, hq)
        scale = p["sm_scale"] * (1.0 if q_scale is None else float(q_scale)) * (1.0 if k_scale is None else float(k_scale))
        # eager: the implementation itself (the Op's generic requires-grad scan over 18 arguments costs
        # ~10 us of host time per layer; attention here has no gradient); compiling: the registered op
        op = paged_decode if torch.compiler.is_compiling() or q.requires_grad else _decode_impl
        op(q, k, v, p["meta"], p["kv_indices"], p["part_o"], p["part_lse"], out,
                     lse if return_lse else p["part_lse"], p["offsets"], p["num_programs"], p["page_size"],
                     self._kv_layout == reference.HND, p["direct"], return_lse, scale, p["soft_cap"], p["window_left"])
        if v_scale is not None and float(v_scale) != 1.0:
            out.mul_(float(v_scale))
        return (out, lse) if return_lse else out

    forward = run

    def run_return_lse(self, q, paged_kv_cache, **kwargs):
        return self.run(q, paged_kv_cache, return_lse=True, **kwargs)

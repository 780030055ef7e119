"""grouped_mm: one GEMM per group (expert) of rows, all groups in one launch.

Validate -> allocate -> launch. The Triton kernel runs on CUDA tensors (and on CPU through the
interpreter when MOECOMM_BACKEND=triton, TRITON_INTERPRET=1); otherwise the pure-torch reference.
Registered as the custom op moecomm::grouped_mm (with a fake and an autograd formula, see
_autograd.py) so torch.compile(fullgraph=True), training and CUDA-graph capture see one opaque node
with a static output shape. grouped_mm() checks its arguments; grouped_mm_unchecked() is its trusted
twin for internal callers.
"""

# Shape legend: M = rows (sum of group sizes), K = in features, N = out features, E = groups,
# T = rows of x before the gather (gather_idx [M] picks them).

from __future__ import annotations

import dataclasses

import functools
from typing import Optional

import torch

from .. import _env
from ..jit import backend as _backend
from ..jit.launch import launch as launch_kernel
from ..jit.ops import define_op
from ..errors import MoeCommValueError, check_choice, check_tensor
from . import _autograd, _configs
from .reference import grouped_mm_reference

LAYOUTS = ("ekn", "enk")
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_OP = "grouped_mm"


# --------------------------------------------------------------------------- validation

def check_offsets_data(op: str, expert_offsets: torch.Tensor, num_rows: int) -> None:
    """offsets[0] == 0, non-decreasing, offsets[E] == M (reads the device data: one sync)."""
    o = expert_offsets.to("cpu", torch.int64)
    if o[0].item() != 0:
        raise MoeCommValueError(f"{op}: expert_offsets[0] must be 0, got {o[0].item()}")
    if o.numel() > 1 and bool((o[1:] < o[:-1]).any()):
        bad = int((o[1:] < o[:-1]).to(torch.int8).argmax())
        raise MoeCommValueError(
            f"{op}: expert_offsets must be non-decreasing, got offsets[{bad}]={o[bad].item()} > offsets[{bad + 1}]={o[bad + 1].item()}")
    if o[-1].item() != num_rows:
        raise MoeCommValueError(f"{op}: expert_offsets[E] must equal the number of rows M={num_rows}, got {o[-1].item()}")


def check_gather_data(op: str, gather_idx: torch.Tensor, num_src_rows: int) -> None:
    if gather_idx.numel() == 0:
        return
    lo, hi = int(gather_idx.min()), int(gather_idx.max())
    if lo < 0 or hi >= num_src_rows:
        raise MoeCommValueError(f"{op}: gather_idx values must be in [0, {num_src_rows}), got range [{lo}, {hi}]")


def validate_grouped(op, x, w, expert_offsets, layout, gather_idx, row_scale, out, validate, *, glu=False):
    """Shape/dtype/device checks shared by grouped_mm and expert_mlp's first GEMM. Returns tensors and (M, N_out)."""
    check_choice(op, "layout", layout, LAYOUTS)
    x = check_tensor(op, "x", x, ndim=2, dtype=_FLOAT_DTYPES)
    w = check_tensor(op, "w", w, ndim=3, dtype=x.dtype, device=x.device)
    E = w.shape[0]
    K = w.shape[1] if layout == "ekn" else w.shape[2]
    N = w.shape[2] if layout == "ekn" else w.shape[1]
    if x.shape[1] != K:
        raise MoeCommValueError(
            f"{op}: x.shape[1] must equal w's K ({K} for layout {layout!r}, w shape {list(w.shape)}), got {x.shape[1]}")
    if K == 0 or N == 0:
        raise MoeCommValueError(f"{op}: w must have K >= 1 and N >= 1, got shape {list(w.shape)}")
    offs = check_tensor(op, "expert_offsets", expert_offsets, ndim=1, dtype=torch.int32, device=x.device)
    if offs.shape[0] != E + 1:
        raise MoeCommValueError(f"{op}: expert_offsets must have shape [E+1] = [{E + 1}], got {list(offs.shape)}")
    if gather_idx is not None:
        gather_idx = check_tensor(op, "gather_idx", gather_idx, ndim=1, dtype=torch.int32, device=x.device)
        M = gather_idx.shape[0]
        if M > 0 and x.shape[0] == 0:
            raise MoeCommValueError(f"{op}: x must have rows to gather from when gather_idx is not empty, got shape {list(x.shape)}")
    else:
        M = x.shape[0]
    if E == 0 and M != 0:
        # no groups (an expert-parallel rank that holds no expert): there can be no rows either
        raise MoeCommValueError(f"{op}: w has no groups (shape {list(w.shape)}), so there must be no rows, got M={M}")
    if row_scale is not None:
        row_scale = check_tensor(op, "row_scale", row_scale, dtype=torch.float32, device=x.device, shape=[M])
    if glu:
        if N % 2:
            raise MoeCommValueError(f"{op}: w_gate_up's output size 2*I must be even, got {N}")
        n_out = N // 2
    else:
        n_out = N
    if out is not None:
        out = check_tensor(op, "out", out, dtype=x.dtype, device=x.device, shape=[M, n_out])
    if _backend.device_checks_allowed(validate):
        check_offsets_data(op, offs, M)
        if gather_idx is not None:
            check_gather_data(op, gather_idx, x.shape[0])
    return x, w, offs, gather_idx, row_scale, out, M, n_out


# --------------------------------------------------------------------------- Triton launch

@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _ensure_allocator() -> None:
    """TMA descriptors built in the kernel need a small global scratch; give Triton torch's allocator."""
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _tma_ok(t: torch.Tensor) -> bool:
    es = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * es) % 16 == 0 for s in t.stride()[:-1]))


def _pow2(x: int) -> int:
    return 1 << max(1, (x - 1).bit_length())


def launch(x, w, offs, out, *, layout, gather_idx=None, row_scale=None, glu=False, act=0,
           config: Optional[_configs.GemmConfig] = None) -> torch.Tensor:
    """Launch grouped_mm_kernel into ``out`` [M, N_out] (config: None = cached/tuned/heuristic pick)."""
    from . import _triton

    M, n_out = out.shape
    if M == 0:
        return out
    E = w.shape[0]
    K = x.shape[1]
    N = w.shape[2] if layout == "ekn" else w.shape[1]
    is_cuda = x.device.type == "cuda"
    if is_cuda:
        _ensure_allocator()
    tma_ok = _tma_ok(w) and (gather_idx is not None or _tma_ok(x))

    def run(cfg: _configs.GemmConfig) -> None:
        num_sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device()) if is_cuda else 4
        n_tiles = -(-n_out // cfg.block_n)
        upper = (-(-M // cfg.block_m) + E) * n_tiles  # bound on the tiles, no sync needed
        grid = max(1, min(num_sms * cfg.programs_per_sm, upper))
        if layout == "ekn":
            s_be, s_bk, s_bn = w.stride(0), w.stride(1), w.stride(2)
        else:
            s_be, s_bk, s_bn = w.stride(0), w.stride(2), w.stride(1)
        launch_kernel(_triton.grouped_mm_kernel, (grid,), (
            x, w, out, offs,
            gather_idx if gather_idx is not None else offs,
            row_scale if row_scale is not None else out,
            M, N, K, E, x.shape[0],
            x.stride(0), x.stride(1),
            s_be, s_bk, s_bn,
            out.stride(0), out.stride(1),
            n_out if glu else 0,
        ), {
            "NUM_PROGRAMS": grid,
            "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
            "E_POW2": _pow2(E),
            "HAS_GATHER": gather_idx is not None, "HAS_SCALE": row_scale is not None,
            "FUSE_GLU": glu, "ACT": act,
            "USE_TMA": cfg.use_tma and tma_ok, "B_KN": layout == "ekn",
            # flatten with the TMA store's run-time branch fails Triton 3.6's loop fusion: one or the other
            "FLATTEN": cfg.flatten, "TMA_STORE": cfg.tma_store and not cfg.flatten and tma_ok and _tma_ok(out),
        }, cfg.num_warps, cfg.num_stages)

    if config is None:
        config = pick_config(x, M, N, K, E, layout=layout, glu=glu, gather=gather_idx is not None, run=run)
    run(config)
    return out


# (device index, M, N, K, E, layout, glu, gather, dtype, cache dir) -> config: the per-call fast path.
# A decode GEMM takes ~0.15 ms on the GPU; building the bucket key and cache path each call cost
# tens of microseconds of host time that showed up directly in the timings (run 2, Qwen3 T1).
_picked: dict[tuple, _configs.GemmConfig] = {}


def pick_config(x, M, N, K, E, *, layout, glu, gather, run) -> _configs.GemmConfig:
    if x.device.type != "cuda":
        return _configs.interpreter_config()
    fast_key = (x.device.index, M, N, K, E, layout, glu, gather, x.dtype, _env.get("MOECOMM_CACHE_DIR"))
    cfg = _picked.get(fast_key)
    if cfg is not None:
        return cfg
    capturing = torch.cuda.is_current_stream_capturing()
    cfg = _pick_config_slow(x, M, N, K, E, layout=layout, glu=glu, gather=gather, run=run)
    if not capturing:  # a heuristic pick made under capture is retried (tuned) on the next eager call
        if len(_picked) >= 4096:  # one entry per distinct row count: bound it for long-running servers
            _picked.clear()
        _picked[fast_key] = cfg
    return cfg


def _pick_config_slow(x, M, N, K, E, *, layout, glu, gather, run) -> _configs.GemmConfig:
    import triton

    key = _configs.bucket_key(M, N, K, E, glu=glu, gather=gather, layout=layout, dtype=str(x.dtype).replace("torch.", ""))
    path = _configs.cache_path(torch.cuda.get_device_name(x.device), triton.__version__)
    cfg = _configs.lookup(path, key)
    if cfg is not None:
        return cfg
    cands = _configs.candidates(M, N, K, E, glu=glu)
    if x.element_size() == 4:
        # the candidates are sized for 16-bit tiles; fp32 (run as tf32) tiles of the same BLOCK_K need
        # twice the shared memory per stage and exceed Hopper's 227 KiB: halve BLOCK_K (same bytes)
        cands = list(dict.fromkeys(dataclasses.replace(c, block_k=max(16, c.block_k // 2)) for c in cands))
    if _env.autotune() and not torch.cuda.is_current_stream_capturing():
        cfg = _configs.tune(cands, run, prefer_first_within=_configs.prefer_first_within(M, E))
        _configs.remember(path, key, cfg, persist=True)
    else:
        cfg = cands[0]
        _configs.remember(path, key, cfg, persist=False)
    return cfg


# --------------------------------------------------------------------------- custom op

def _grouped_mm_into(x, w, expert_offsets, layout, gather_idx, row_scale, out):
    if _backend.choose(x, _OP) is _backend.Impl.TRITON:
        return launch(x, w, expert_offsets, out, layout=layout, gather_idx=gather_idx, row_scale=row_scale)
    out.copy_(grouped_mm_reference(x, w, expert_offsets, layout=layout, gather_idx=gather_idx, row_scale=row_scale))
    return out


def _out_shape(x, w, layout, gather_idx) -> tuple[int, int]:
    return (gather_idx.shape[0] if gather_idx is not None else x.shape[0]), (w.shape[2] if layout == "ekn" else w.shape[1])


def _grouped_mm_impl(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor, layout: str,
                     gather_idx: Optional[torch.Tensor], row_scale: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty(_out_shape(x, w, layout, gather_idx), dtype=x.dtype, device=x.device)
    return _grouped_mm_into(x, w, expert_offsets, layout, gather_idx, row_scale, out)


grouped_mm_op = define_op(
    "grouped_mm", _grouped_mm_impl,
    fake=lambda x, w, expert_offsets, layout, gather_idx, row_scale: x.new_empty(_out_shape(x, w, layout, gather_idx)),
    setup_context=_autograd.grouped_mm_setup, backward=_autograd.grouped_mm_backward)


def direct_into_out(out, *args) -> bool:
    """Whether a call with a caller-owned ``out`` may run the implementation into it directly: eager,
    and no autograd to record (then the op runs, and its result is copied into ``out``)."""
    if out is None or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args))


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    layout: str = "ekn",
    gather_idx: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Grouped GEMM: out[m] = row_scale[m] * A[m] @ W[e] for every row m of group e.

    Args:
        x: [M, K] (or [T, K] with gather_idx), bf16/fp16 (fp32 accepted; on the GPU it runs as tf32),
            the rows of all groups back to back.
        w: [E, K, N] for layout "ekn", or [E, N, K] for "enk" (nn.Linear / Hugging Face layout), same
            dtype and device as x; any strides (a transposed view works).
        expert_offsets: [E+1] int32 on x's device; group e owns rows offsets[e]:offsets[e+1]; sizes
            may be zero; read on the device only (no host sync).
        layout: "ekn" or "enk", see w.
        gather_idx: optional [M] int32; row m of A is x[gather_idx[m]] (the permute fused into the load).
        row_scale: optional [M] fp32; multiplies output row m in the epilogue (routing weights).
        out: optional [M, N] with x's dtype, written in place and returned.
        validate: check the device data (offsets start at 0, non-decreasing, end at M; gather_idx in
            range): one host sync. Skipped anyway under CUDA-graph capture and torch.compile tracing;
            the kernel clamps its indices, so bad data gives wrong numbers, never a bad memory access.

    Returns:
        [M, N] in x's dtype.

    Example:
        >>> offs = torch.tensor([0, 3, 3, 8], dtype=torch.int32)       # 3 groups: 3, 0, 5 rows
        >>> y = grouped_mm(torch.randn(8, 16), torch.randn(3, 16, 4), offs)  # [8, 4]
    """
    x, w, offs, gather_idx, row_scale, out, M, N = validate_grouped(
        _OP, x, w, expert_offsets, layout, gather_idx, row_scale, out, validate)
    return grouped_mm_unchecked(x, w, offs, layout, gather_idx, row_scale, out)


def grouped_mm_unchecked(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor, layout: str = "ekn",
                         gather_idx: torch.Tensor | None = None, row_scale: torch.Tensor | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """grouped_mm without any check, for callers whose arguments are right by construction. Eager
    calls without autograd run the implementation directly (the dispatcher costs tens of microseconds
    per call; a decode GEMM takes ~150); autograd and torch.compile go through the registered op."""
    if direct_into_out(out, x, w, row_scale):
        return _grouped_mm_into(x, w, expert_offsets, layout, gather_idx, row_scale, out)
    y = grouped_mm_op(x, w, expert_offsets, layout, gather_idx, row_scale)
    if out is not None:
        out.copy_(y)
        return out
    return y

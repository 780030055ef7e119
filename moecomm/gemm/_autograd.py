"""The autograd formulas of grouped_mm and expert_mlp, and the weight-gradient op they share.

# Shape legend: M = rows (sum of group sizes), K = in features, N = out features, E = groups,
# T = rows of x before the gather, H = hidden, I = intermediate (per GLU half), P, Q: any widths.

grouped_mm: out[m] = s[m] * A[m] @ W[e] (A = x or x[gather_idx], s = row_scale, e the group of m).
With G = s * d out:
- d A = G @ W[e]^T: the same grouped GEMM with the other layout (the weight read transposed);
  d x sums d A over the gathered rows (index_add_ in fp32);
- d W[e] = A_e^T G_e: a contraction over each group's rows, the op moecomm::grouped_mm_wgrad below;
- d s[m] = <d out[m], A[m] @ W[e]>: the unscaled product, recomputed only when s needs a gradient.
expert_mlp: recompute the gate_up pre-activation h = A @ Wgu[e] with the grouped GEMM, then
inter = act(gate) * up (rounded to x's dtype, as the forward writes it), and chain the two GEMMs'
formulas through the GLU's derivative (aten's silu_backward / gelu_backward).

Everything here is traceable (torch.compile traces the backward with fake tensors): the GEMMs are
the registered ops, and the one piece that reads the offsets on the host (the weight gradient's
loop over groups, off the bf16 CUDA path) lives inside its own custom op.
"""

from __future__ import annotations

import torch

from ..jit.backend import warn_once
from ..jit.ops import define_op

FLIP = {"ekn": "enk", "enk": "ekn"}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- d W: one op


def _wgrad_impl(a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """[E, P, Q]: out[e] = a[rows of e]^T @ b[rows of e], fp32 accumulation, in a's dtype."""
    num_groups = expert_offsets.shape[0] - 1
    if (a.is_cuda and a.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and a.shape[0] > 0
            and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0):
        # cuBLAS's grouped GEMM contracts over each group's rows without a host sync (bf16, sm_90)
        try:
            out = torch._grouped_mm(a.t(), b.contiguous(), offs=expert_offsets[1:])  # [E, P, Q]
            # an expert without rows must get a zero gradient, whatever the library writes there
            has_rows = (expert_offsets[1:] > expert_offsets[:-1])[:, None, None]
            return torch.where(has_rows, out, torch.zeros((), dtype=out.dtype, device=out.device))
        except RuntimeError as exc:  # its argument checks (older GPU, layout): the loop below
            warn_once("grouped-mm-wgrad", f"grouped_mm backward: torch._grouped_mm refused the weight gradient ({exc}); "
                      "using a loop over the groups (one host read of the offsets per backward)")
    acc = _acc(a.dtype)
    out = torch.zeros(num_groups, a.shape[1], b.shape[1], dtype=acc, device=a.device)
    offs = expert_offsets.tolist()  # elsewhere: one host read per backward, a loop over the groups
    for e in range(num_groups):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            out[e] = a[lo:hi].to(acc).t() @ b[lo:hi].to(acc)
    return out.to(a.dtype)


grouped_mm_wgrad = define_op(
    "grouped_mm_wgrad", _wgrad_impl,
    fake=lambda a, b, expert_offsets: a.new_empty(expert_offsets.shape[0] - 1, a.shape[1], b.shape[1]),
    differentiable=False)


def _weight_grad(a: torch.Tensor, g: torch.Tensor, offs: torch.Tensor, layout: str) -> torch.Tensor:
    """d W for out = A @ W[e] ("ekn", W [E, K, N]) or A @ W[e]^T ("enk", W [E, N, K])."""
    return grouped_mm_wgrad.op(a, g, offs) if layout == "ekn" else grouped_mm_wgrad.op(g, a, offs)


# --------------------------------------------------------------------------- helpers


def _scale_rows(g: torch.Tensor, row_scale: torch.Tensor | None) -> torch.Tensor:
    if row_scale is None:
        return g
    acc = _acc(g.dtype)
    return (g.to(acc) * row_scale.to(acc)[:, None]).to(g.dtype)


def _row_dot(g: torch.Tensor, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    acc = _acc(g.dtype)
    return (g.to(acc) * p.to(acc)).sum(dim=-1).to(dtype)


def _scatter_rows(grad_a: torch.Tensor, gather_idx: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """d x [T, K] from d A [M, K]: the rows gathered more than once sum their gradients (in fp32)."""
    if gather_idx is None:
        return grad_a
    acc = _acc(x.dtype)
    gx = torch.zeros(x.shape, dtype=acc, device=x.device)
    return gx.index_add_(0, gather_idx.long(), grad_a.to(acc)).to(x.dtype)


def _gathered(x: torch.Tensor, gather_idx: torch.Tensor | None) -> torch.Tensor:
    return x if gather_idx is None else x.index_select(0, gather_idx.long())


def _gemm(a, w, offs, layout, gather_idx=None, row_scale=None) -> torch.Tensor:
    return torch.ops.moecomm.grouped_mm(a, w, offs, layout, gather_idx, row_scale)


# --------------------------------------------------------------------------- grouped_mm


def grouped_mm_setup(ctx, inputs, output) -> None:
    x, w, offs, layout, gather_idx, row_scale = inputs
    ctx.save_for_backward(x, w, offs, gather_idx, row_scale)
    ctx.layout = layout


def grouped_mm_backward(ctx, grad_out):
    x, w, offs, gather_idx, row_scale = ctx.saved_tensors
    layout = ctx.layout
    need_x, need_w, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[5]
    g = grad_out.contiguous()
    gs = _scale_rows(g, row_scale)  # [M, N]
    gx = gw = gsc = None
    if need_x:
        gx = _scatter_rows(_gemm(gs, w, offs, FLIP[layout]), gather_idx, x)
    if need_w:
        gw = _weight_grad(_gathered(x, gather_idx), gs, offs, layout)
    if need_s and row_scale is not None:
        gsc = _row_dot(g, _gemm(x, w, offs, layout, gather_idx), row_scale.dtype)
    return gx, gw, None, None, None, gsc


# --------------------------------------------------------------------------- expert_mlp


def _act_backward(grad: torch.Tensor, gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, gate)
    return torch.ops.aten.gelu_backward(grad, gate, approximate="none")


def _act(gate: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.nn.functional.silu(gate) if activation == "silu" else torch.nn.functional.gelu(gate)


def expert_mlp_setup(ctx, inputs, output) -> None:
    x, w_gate_up, w_down, offs, layout, activation, gather_idx, row_scale = inputs
    ctx.save_for_backward(x, w_gate_up, w_down, offs, gather_idx, row_scale)
    ctx.layout, ctx.activation = layout, activation


def expert_mlp_backward(ctx, grad_out):
    x, w_gu, w_dn, offs, gather_idx, row_scale = ctx.saved_tensors
    layout, activation = ctx.layout, ctx.activation
    need_x, need_gu, need_dn, need_s = (ctx.needs_input_grad[i] for i in (0, 1, 2, 7))
    acc = _acc(x.dtype)
    # recompute the forward's intermediate: h [M, 2I] (gate | up), inter [M, I] in x's dtype
    h = _gemm(x, w_gu, offs, layout, gather_idx).to(acc)
    gate, up = h.chunk(2, dim=-1)
    act = _act(gate, activation)
    inter = (act * up).to(x.dtype)
    g = grad_out.contiguous()
    gs = _scale_rows(g, row_scale)  # [M, H]
    g_dn = g_s = g_gu = gx = None
    if need_dn:
        g_dn = _weight_grad(inter, gs, offs, layout)
    if need_s and row_scale is not None:
        g_s = _row_dot(g, _gemm(inter, w_dn, offs, layout), row_scale.dtype)
    if need_x or need_gu:
        g_inter = _gemm(gs, w_dn, offs, FLIP[layout]).to(acc)  # [M, I]
        g_h = torch.cat([_act_backward(g_inter * up, gate, activation), g_inter * act], dim=-1).to(x.dtype)  # [M, 2I]
        if need_gu:
            g_gu = _weight_grad(_gathered(x, gather_idx), g_h, offs, layout)
        if need_x:
            gx = _scatter_rows(_gemm(g_h, w_gu, offs, FLIP[layout]), gather_idx, x)
    return gx, g_gu, g_dn, None, None, None, None, g_s

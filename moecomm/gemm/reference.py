"""Pure-torch references of the grouped GEMM and the expert MLP: the truth in tests, the CPU path.

Obviously correct over fast: a Python loop over groups (it reads the offsets on the host, which the
GPU kernel never does). Arithmetic in fp32 (float64 when the inputs are float64), cast at the end.
"""

# Shape legend: M = rows (sum of group sizes), K = in features, N = out features, E = groups,
# T = rows of x before the gather, H = hidden, I = intermediate (per GLU half).

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def grouped_mm_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    layout: str = "ekn",
    gather_idx: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[m] = row_scale[m] * A[m] @ W[e] for m in group e; A = x or x[gather_idx].

    Args: as moecomm.gemm.grouped_mm (x [T or M, K], w [E, K, N] "ekn" / [E, N, K] "enk",
    expert_offsets [E+1] int32, gather_idx [M] int32, row_scale [M] fp32). Returns [M, N] in x.dtype.
    """
    acc = _acc_dtype(x.dtype)
    a = x[gather_idx.long()] if gather_idx is not None else x
    wk = w if layout == "ekn" else w.transpose(1, 2)  # [E, K, N]
    M, N = a.shape[0], wk.shape[2]
    out = torch.zeros(M, N, dtype=acc, device=x.device)
    offs = expert_offsets.tolist()
    for e in range(wk.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            out[lo:hi] = a[lo:hi].to(acc) @ wk[e].to(acc)
    if row_scale is not None:
        out = out * row_scale.to(acc)[:, None]
    return out.to(x.dtype)


def activation_reference(gate: torch.Tensor, name: str) -> torch.Tensor:
    """silu(x) = x * sigmoid(x) (Mixtral, Qwen, DeepSeek); gelu = exact erf GELU."""
    if name == "silu":
        return F.silu(gate)
    return F.gelu(gate, approximate="none")


def glu_reference(h: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up of h [M, 2I] whose first I columns are gate, last I up (HF's .chunk(2, -1))."""
    gate, up = h.chunk(2, dim=-1)
    return activation_reference(gate, activation) * up


def expert_mlp_reference(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    layout: str = "enk",
    activation: str = "silu",
    gather_idx: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """down(act(gate(A)) * up(A)) per group, times row_scale. Returns [M, H] in x.dtype.

    The intermediate [M, I] is rounded to x.dtype, as the fused kernel writes it.
    """
    acc = _acc_dtype(x.dtype)
    h = grouped_mm_reference(x.to(acc), w_gate_up.to(acc), expert_offsets, layout=layout, gather_idx=gather_idx)
    inter = glu_reference(h, activation).to(x.dtype)
    return grouped_mm_reference(inter, w_down, expert_offsets, layout=layout, row_scale=row_scale)

"""expert_mlp: the MoE experts' SwiGLU/GeGLU MLP as two grouped GEMMs.

1. gate_up grouped GEMM with act(gate) * up fused into its epilogue: each program computes a gate
   tile and its matching up tile (two fp32 accumulators over the same A tile), so the [M, 2I]
   pre-activation never reaches memory; [M, I] is written once.
2. down grouped GEMM with the routing weight (row_scale) applied in its epilogue.
Registered as the custom op moecomm::expert_mlp (with a fake).
"""

# Shape legend: M = rows (sum of group sizes), H = hidden, I = intermediate (per GLU half),
# E = experts, T = rows of x before the gather.

from __future__ import annotations

from typing import Optional

import torch

from ..jit import backend as _backend
from ..errors import MoeCommValueError, check_choice, check_tensor
from .api import launch, validate_grouped
from .reference import ACTIVATIONS, expert_mlp_reference

_OP = "expert_mlp"


def _act_code(activation: str) -> int:
    from . import _triton  # imports triton: only on the Triton path, so `import moecomm.gemm` needs no Triton

    return {"silu": _triton.ACT_SILU, "gelu": _triton.ACT_GELU}[activation]


def _mlp_impl(x, w_gate_up, w_down, expert_offsets, layout, activation, gather_idx, row_scale, out):
    if _backend.use_triton(x, _OP):
        M = out.shape[0]
        inter_size = w_down.shape[2] if layout == "enk" else w_down.shape[1]
        inter = torch.empty(M, inter_size, dtype=x.dtype, device=x.device)  # [M, I]
        launch(x, w_gate_up, expert_offsets, inter, layout=layout, gather_idx=gather_idx,
               glu=True, act=_act_code(activation))
        return launch(inter, w_down, expert_offsets, out, layout=layout, row_scale=row_scale)
    out.copy_(expert_mlp_reference(x, w_gate_up, w_down, expert_offsets, layout=layout, activation=activation,
                                   gather_idx=gather_idx, row_scale=row_scale))
    return out


@torch.library.custom_op("moecomm::expert_mlp", mutates_args=())
def _expert_mlp_op(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, expert_offsets: torch.Tensor,
                   layout: str, activation: str, gather_idx: Optional[torch.Tensor],
                   row_scale: Optional[torch.Tensor]) -> torch.Tensor:
    M = gather_idx.shape[0] if gather_idx is not None else x.shape[0]
    H = w_down.shape[1] if layout == "enk" else w_down.shape[2]
    out = torch.empty(M, H, dtype=x.dtype, device=x.device)
    return _mlp_impl(x, w_gate_up, w_down, expert_offsets, layout, activation, gather_idx, row_scale, out)


@_expert_mlp_op.register_fake
def _(x, w_gate_up, w_down, expert_offsets, layout, activation, gather_idx, row_scale):
    M = gather_idx.shape[0] if gather_idx is not None else x.shape[0]
    H = w_down.shape[1] if layout == "enk" else w_down.shape[2]
    return x.new_empty(M, H)


def expert_mlp(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    layout: str = "enk",
    activation: str = "silu",
    gather_idx: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """The experts' gated MLP: out[m] = row_scale[m] * (act(A[m] Wg[e]) * (A[m] Wu[e])) @ Wd[e].

    Args:
        x: [M, H] (or [T, H] with gather_idx), bf16/fp16 (fp32 on CPU), rows of all experts back to back.
        w_gate_up: [E, 2I, H] for layout "enk" (transformers' gate_up_proj: gate rows first, then up),
            or [E, H, 2I] for "ekn"; same dtype and device as x.
        w_down: [E, H, I] for "enk" (transformers' down_proj), or [E, I, H] for "ekn".
        expert_offsets: [E+1] int32 on x's device; expert e owns rows offsets[e]:offsets[e+1].
        layout: "enk" (default, Hugging Face) or "ekn", for both weights.
        activation: "silu" (Mixtral, Qwen, DeepSeek) or "gelu" (exact erf GELU).
        gather_idx: optional [M] int32; row m of A is x[gather_idx[m]].
        row_scale: optional [M] fp32 routing weights, applied in the down GEMM's epilogue.
        out: optional [M, H] with x's dtype, written in place and returned.
        validate: check offsets/gather_idx device data (one sync); skipped under capture/compile.

    Returns:
        [M, H] in x's dtype. The intermediate act(gate) * up [M, I] is rounded to x's dtype.

    Example:
        >>> E, H, I = 4, 64, 32
        >>> offs = torch.tensor([0, 2, 2, 5, 9], dtype=torch.int32)
        >>> y = expert_mlp(torch.randn(9, H), torch.randn(E, 2 * I, H), torch.randn(E, H, I), offs)  # [9, 64]
    """
    check_choice(_OP, "activation", activation, ACTIVATIONS)
    x, w_gate_up, offs, gather_idx, row_scale, out_checked, M, inter_size = validate_grouped(
        _OP, x, w_gate_up, expert_offsets, layout, gather_idx, row_scale, None, validate, glu=True)
    w_down = check_tensor(_OP, "w_down", w_down, ndim=3, dtype=x.dtype, device=x.device)
    E = w_gate_up.shape[0]
    H = x.shape[1]
    want = [E, H, inter_size] if layout == "enk" else [E, inter_size, H]
    if list(w_down.shape) != want:
        raise MoeCommValueError(f"{_OP}: w_down must have shape {want} for layout {layout!r}, got {list(w_down.shape)}")
    if out is not None:
        out = check_tensor(_OP, "out", out, dtype=x.dtype, device=x.device, shape=[M, H])
    if not torch.compiler.is_compiling():
        # Eager: direct call, no custom-op dispatch (see grouped_mm for why).
        if out is None:
            out = torch.empty(M, H, dtype=x.dtype, device=x.device)
        return _mlp_impl(x, w_gate_up, w_down, offs, layout, activation, gather_idx, row_scale, out)
    y = torch.ops.moecomm.expert_mlp(x, w_gate_up, w_down, offs, layout, activation, gather_idx, row_scale)
    if out is not None:
        out.copy_(y)
        return out
    return y

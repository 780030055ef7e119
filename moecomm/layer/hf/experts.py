"""moecomm as one of transformers' experts implementations: the "moecomm" choice of
config._experts_implementation (model.set_experts_implementation("moecomm"), or
from_pretrained(..., experts_implementation="moecomm")).

# T = num_tokens, H = hidden, I = moe intermediate, E = num_experts, k = top_k, M = T * k routed rows

Two ways to run a transformers MoE model on moecomm:
- patch_hf_model(model): the whole block (router, dispatch, grouped GEMMs, combine) is moecomm's;
  patch_hf_model sets the model's experts implementation to "moecomm" so that transformers reports
  it. A later set_experts_implementation("eager" / "grouped_mm" / "batched_mm") makes the patched
  blocks run transformers' own block forward with that implementation; "moecomm" brings ours back.
- set_experts_implementation("moecomm") on an unpatched model: transformers routes, and only the
  experts (permute, the two grouped GEMMs with SiLU*mul fused, the weighted combine) are moecomm's.
"""

from __future__ import annotations

import torch

NAME = "moecomm"

__all__ = ["NAME", "experts_forward", "register"]


def _activation(experts) -> str:
    name = type(experts.act_fn).__name__.lower()
    return "silu" if ("silu" in name or "swish" in name) else "gelu"


def experts_forward(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """A transformers experts module's forward on moecomm's kernels.

    Args:
        experts: the module (gate_up_proj [E, 2I, H], down_proj [E, H, I], act_fn SiLU or GELU).
        hidden_states: [T, H]. top_k_index: [T, k] expert ids. top_k_weights: [T, k] routing weights.

    Returns [T, H] in hidden_states' dtype: sum over k of weight * expert(x).
    """
    from ...ep import LocalDispatcher
    from ...gemm import expert_mlp

    w_gate_up, w_down = experts.gate_up_proj, experts.down_proj
    d = LocalDispatcher(w_gate_up.shape[0], top_k_index.shape[-1])
    r = d.dispatch(hidden_states, top_k_index, top_k_weights.float())
    h = expert_mlp(r.tokens, w_gate_up, w_down, r.expert_offsets, layout="enk", activation=_activation(experts),
                   gather_idx=r.gather_idx, row_scale=r.row_weights)  # [M, H], rows weighted
    return d.combine(h, r.handle).to(hidden_states.dtype)


def register() -> bool:
    """Make "moecomm" a valid experts implementation of the installed transformers (idempotent).
    Returns False when transformers has no experts interface (older than 5)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    if NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(NAME, experts_forward)
    return True

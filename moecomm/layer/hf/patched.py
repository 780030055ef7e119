"""HFMoE: a moecomm.MoE standing in a transformers block's place, in the block's own layout.

# T = num_tokens, H = hidden, E = num_experts

The layer holds the block's submodules and tensors themselves, under the block's names (gate,
experts with gate_up_proj / down_proj, shared_expert(s), shared_expert_gate, a block-level
e_score_correction_bias): the same objects, not copies. So everything transformers does by name
keeps working on a patched model: state_dict / load_state_dict, save_pretrained / from_pretrained
(safetensors, in transformers' key names), a tp_plan naming mlp.experts.gate_up_proj, weights
loaded after patching on the meta device (load_state_dict(assign=True) replaces the experts'
Parameters, and the layer reads them through the experts module), .to() / .half() / .bfloat16().
Only the forward is moecomm's: the layer's properties w_gate_up, w_down, e_score_correction_bias,
shared_experts and shared_expert_gate read the block's tensors for MoE's forward and reference.

Router logits: transformers records them (output_router_logits, the load-balancing loss) with a
forward hook on the block's router. Once any hook is on the router, the layer calls the router
module and routes from the logits it returned, so the recorded logits, and the aux loss with its
gradient, are the unpatched model's; without hooks it computes the same logits itself (the router's
own softmax / top-k would be wasted work) and may replay CUDA graphs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...routing import Routing, RoutingMethod
from ..config import MoEConfig
from ..moe import MoE
from .blocks import BlockRow
from .experts import NAME

__all__ = ["HFMoE"]


class HFMoE(MoE):
    """A moecomm.MoE computing what a transformers MoE block computes, in that block's layout.

    Args:
        block: the transformers block (its row of moecomm.layer.hf.blocks.BLOCKS is ``row``).
        row: its BlockRow. config: the MoEConfig read off the block (see from_hf).
        dtype, device: of the block's experts.

    Attributes beside MoE's: ``hf_block``, the replaced block (restore() puts the layer's current
    tensors back into it), ``row``, ``jitter_noise`` (Mixtral's and MiniMax's router_jitter_noise),
    ``routes_with_block_router`` (the routing is the block's router module's: see
    convert.routes_beyond_kept_groups; the experts, dispatch and combine stay moecomm's).
    """

    def __init__(self, block: nn.Module, row: BlockRow, config: MoEConfig, *, dtype: torch.dtype, device: Any,
                 routes_with_block_router: bool = False):
        nn.Module.__init__(self)
        self.routes_with_block_router = routes_with_block_router
        object.__setattr__(self, "_hf_block", block)  # not a submodule: its tensors are the layer's, counted once
        self.row = row
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        # transformers' experts implementation when the block was replaced (unpatch puts it back), and
        # whether the forward follows the knob (patch_hf_model sets it to "moecomm" and this to True)
        self.experts_implementation_before = self._experts_implementation(block.experts)
        self.follows_experts_implementation = False
        self._build(config, dtype=dtype, device=device, ep_group=None, placement=None)
        self.train(block.training)

    # ------------------------------------------------------------------ the block's tensors
    def _make_parameters(self, dtype: torch.dtype, device: Any) -> None:
        b = self._hf_block
        self._modules.update(b._modules)
        self._parameters.update(b._parameters)
        self._buffers.update(b._buffers)
        self._non_persistent_buffers_set |= b._non_persistent_buffers_set

    def reset_parameters(self) -> None:
        """Nothing: the weights are the block's (transformers initialises or loads them)."""

    @property
    def hf_block(self) -> nn.Module:
        return self._hf_block

    @property
    def w_gate_up(self) -> torch.Tensor:
        return self._modules["experts"].gate_up_proj

    @property
    def w_down(self) -> torch.Tensor:
        return self._modules["experts"].down_proj

    @property
    def e_score_correction_bias(self) -> torch.Tensor | None:
        where = self.row.kind.bias
        if where == "gate":
            return self._modules["gate"].e_score_correction_bias
        return self._buffers.get("e_score_correction_bias") if where == "block" else None

    @property
    def shared_experts(self) -> nn.Module | None:
        name = self.row.shared_name
        return None if name is None else self._modules.get(name)

    @property
    def shared_expert_gate(self) -> nn.Module | None:
        return self._modules.get("shared_expert_gate") if self.row.shared_gate else None

    def restore(self) -> nn.Module:
        """The replaced block, holding this layer's current submodules and tensors (after .to(), a
        load with assign=True, training) and its train/eval mode."""
        b = self._hf_block
        b._modules.update(self._modules)
        b._parameters.update(self._parameters)
        b._buffers.update(self._buffers)
        return b.train(self.training)

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _experts_implementation(experts: nn.Module) -> str | None:
        return getattr(getattr(experts, "config", None), "_experts_implementation", None)

    def runs_moecomm(self) -> bool:
        """Whether forward runs moecomm's layer: always for a layer from from_hf(block); in a model patched by
        patch_hf_model, while its config._experts_implementation is "moecomm" (another choice made later,
        set_experts_implementation("eager") say, runs transformers' block with it)."""
        if self.parallel_by_transformers():
            return False
        return not self.follows_experts_implementation or self._experts_implementation(self._modules["experts"]) == NAME

    def parallel_by_transformers(self) -> bool:
        """Whether transformers' tensor or expert parallelism (tp_plan / ep_plan, DistributedConfig) runs this
        block: its styles shard the experts' Parameters into DTensors and replace the gate's and the experts'
        forward on the instance (the all-reduce of partial outputs, the EP router's local expert ids). moecomm's
        layer is written for whole, local tensors: on DTensors its reference ops still come out right on CPU
        (torch's DTensor dispatch redistributes per op: transformers' test_tp_* / test_ep_* pass either way),
        but at the cost of gathering shards, and its custom GPU kernels take plain tensors only. So the
        block's own forward, through those wrapped modules, runs instead (transformers' sharded path); the
        state_dict and the plan's names stay transformers' own."""
        ex, gate = self._modules["experts"], self._modules["gate"]
        return "forward" in ex.__dict__ or "forward" in gate.__dict__ or type(ex.gate_up_proj).__name__ == "DTensor"

    def _gate_hooked(self) -> bool:
        g = self._modules["gate"]
        return bool(g._forward_hooks or g._forward_pre_hooks or nn.modules.module._global_forward_hooks)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> logits [T, E] as the block's router computes them (its module, when hooked)."""
        gate = self._modules["gate"]
        if self._gate_hooked():  # transformers is recording router logits (or someone else watches)
            out = gate(x, self._buffers["e_score_correction_bias"]) if self.row.kind.bias == "block" else gate(x)
            return out[0] if isinstance(out, tuple) else out
        w = gate.weight
        if self.row.kind.bias == "block":  # MiniMax-M2: logits in the weight's dtype, sigmoid in fp32
            return F.linear(x.to(w.dtype), w)
        if self.routing == RoutingMethod.SIGMOID_GROUPED_TOPK:
            return F.linear(x.float(), w.float())
        return F.linear(x, w)

    def _route_unchecked(self, x2: torch.Tensor) -> Routing:
        """MoE's routing, or (routes_with_block_router) the block's router module's own top-k ids and weights."""
        if not self.routes_with_block_router:
            return super()._route_unchecked(x2)
        _, topk_weights, topk_ids = self._modules["gate"](x2)  # transformers' grouped routers return 3 tensors
        return Routing(topk_ids.to(torch.int32), topk_weights.float())

    def _may_replay(self, x2: torch.Tensor) -> bool:
        return not self._gate_hooked() and super()._may_replay(x2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, H] (any [..., H]) -> [..., H], as the block's forward."""
        if not self.runs_moecomm():
            return self.restore().forward(x)  # the block holds the current tensors: its forward, its choice
        if self.training and self.jitter_noise > 0:  # as Mixtral's block: same draw, same place in the RNG stream
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{self.row.block} -> moecomm, " + super().extra_repr()

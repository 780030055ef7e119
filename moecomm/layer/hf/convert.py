"""Hugging Face transformers integration: build a moecomm.MoE from a model's MoE block, sharing its weights.

# T = num_tokens, H = hidden, I = moe intermediate, E = num_experts, k = top_k

Supported blocks (transformers 5.x layout: experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]).
Their routers and forwards were read against the kinds below (transformers 5.17), and each block is
tested against its real class (tests/hf):

| routing                                                | blocks                                                          |
|--------------------------------------------------------|-----------------------------------------------------------------|
| softmax top-k, always renormalised                     | Mixtral, MiniMax-Text-01, Qwen3.5-MoE*, Qwen3-VL-MoE (text)     |
| softmax top-k, renormalised if gate.norm_topk_prob     | Qwen2-MoE*, Qwen3-MoE, Qwen3-Next*, Qwen3-Omni-MoE thinker and talker*, Qwen4Exp*, OLMoE, FlexOlmo, Mellum |
| sigmoid + e_score_correction_bias, grouped top-k, renormalised if norm_topk_prob, x routed_scaling_factor; shared_experts | DeepSeek-V3, DeepSeek-V3.2, GLM-4.5 (Glm4Moe), Glm4vMoe (text), Glm4MoeLite, GlmMoeDsa, dots.llm1 (Dots1), Kimi-Linear, SolarOpen, ExaoneMoe, MiMo-V2-Flash (no shared expert) |
| sigmoid + the block's e_score_correction_bias, top-k, always renormalised | MiniMax-M2                                    |

(*) with shared_expert * sigmoid(shared_expert_gate(x)).

Every one of those blocks' forward takes hidden_states [B, S, H] and returns one tensor [B, S, H];
MoE.forward returns the same. Weights are shared, not copied: the MoE's Parameters *are* the block's
(same storage, same data_ptr), so a patched model's memory does not grow.

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-30B-A3B", dtype=torch.bfloat16, device_map="cuda")
    moecomm.patch_hf_model(model)   # -> 48
    model.generate(...)
"""

from __future__ import annotations

from torch import nn

from ...errors import MoeCommTypeError, MoeCommValueError
from ...routing import RoutingMethod
from ..moe import MoE

__all__ = ["SUPPORTED_BLOCKS", "from_hf", "patch_hf_model"]

# block class name -> its routing: "softmax" (renormalised if gate.norm_topk_prob), "softmax_renorm"
# (always), "sigmoid_grouped" (DeepSeek-V3's router), "sigmoid_bias" (MiniMax-M2: the bias on the block)
_ROUTING = {
    "MixtralSparseMoeBlock": "softmax_renorm",
    "MiniMaxSparseMoeBlock": "softmax_renorm",
    "Qwen3_5MoeSparseMoeBlock": "softmax_renorm",
    "Qwen3VLMoeTextSparseMoeBlock": "softmax_renorm",
    "Qwen2MoeSparseMoeBlock": "softmax",
    "Qwen3MoeSparseMoeBlock": "softmax",
    "Qwen3NextSparseMoeBlock": "softmax",
    "Qwen3OmniMoeThinkerTextSparseMoeBlock": "softmax",
    "Qwen3OmniMoeTalkerTextSparseMoeBlock": "softmax",
    "Qwen4ExpTextSparseMoeBlock": "softmax",
    "OlmoeSparseMoeBlock": "softmax",
    "FlexOlmoSparseMoeBlock": "softmax",
    "MellumSparseMoeBlock": "softmax",
    "DeepseekV3MoE": "sigmoid_grouped",
    "DeepseekV32MoE": "sigmoid_grouped",
    "Glm4MoeMoE": "sigmoid_grouped",
    "Glm4vMoeTextMoE": "sigmoid_grouped",
    "Glm4MoeLiteMoE": "sigmoid_grouped",
    "GlmMoeDsaMoE": "sigmoid_grouped",
    "Dots1MoE": "sigmoid_grouped",
    "KimiLinearMoE": "sigmoid_grouped",
    "SolarOpenMoE": "sigmoid_grouped",
    "ExaoneMoeSparseMoEBlock": "sigmoid_grouped",
    "MiMoV2FlashMoE": "sigmoid_grouped",
    "MiniMaxM2SparseMoeBlock": "sigmoid_bias",
}
SUPPORTED_BLOCKS = tuple(_ROUTING)


def _family(block: nn.Module) -> str | None:
    # by class name along the MRO: subclasses (a fine-tuned variant's block) are recognised too, and
    # no transformers model module needs importing here
    for cls in type(block).__mro__:
        if cls.__name__ in SUPPORTED_BLOCKS:
            return cls.__name__
    return None


def _activation(act: nn.Module, where: str) -> str:
    name = type(act).__name__.lower()
    if "silu" in name or "swish" in name:
        return "silu"
    if name in ("geluactivation", "gelu"):
        return "gelu"
    raise MoeCommValueError(f"from_hf: {where} activation must be SiLU or exact GELU, got {type(act).__name__}")


def _shared_mlp(block: nn.Module) -> nn.Module | None:
    # Qwen2-MoE names it shared_expert, DeepSeek-V3 shared_experts (n_shared_experts fused into one MLP)
    for name in ("shared_expert", "shared_experts"):
        mod = getattr(block, name, None)
        if mod is not None:
            return mod
    return None


def from_hf(block: nn.Module) -> MoE:
    """Build a moecomm.MoE computing what a transformers MoE block computes, sharing its weights.

    Args:
        block: one of SUPPORTED_BLOCKS (transformers >= 5; the module docstring lists their routing), on
            any device, any dtype. Its Parameters are reused, not copied.

    Returns:
        an MoE in eval mode on the block's device and dtype; forward(x [B, S, H]) -> [B, S, H].

    Raises:
        MoeCommTypeError: the block is of another type (the message lists the supported ones).

    Example:
        >>> moe = moecomm.from_hf(model.model.layers[0].mlp)
        >>> torch.testing.assert_close(moe(x), model.model.layers[0].mlp(x))
    """
    fam = _family(block)
    if fam is None:
        raise MoeCommTypeError(f"from_hf: block must be one of {', '.join(SUPPORTED_BLOCKS)}, got {type(block).__name__}")
    experts, gate = block.experts, block.gate
    w_gate_up, w_down = experts.gate_up_proj, experts.down_proj
    if w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise MoeCommValueError(
            f"from_hf: experts.gate_up_proj must be 3-D [E, 2I, H] (transformers >= 5 layout), got shape {list(w_gate_up.shape)}"
        )
    E, two_i, H = w_gate_up.shape
    if getattr(experts, "is_transposed", False) or tuple(w_down.shape) != (E, H, two_i // 2):
        raise MoeCommValueError(
            f"from_hf: experts.down_proj must have shape [{E}, {H}, {two_i // 2}] (layout 'enk'), got {list(w_down.shape)}"
        )
    if getattr(experts, "has_bias", False) or not getattr(experts, "is_concatenated", True):
        raise MoeCommValueError("from_hf: experts must be concatenated [gate; up] without bias, got a biased or interleaved layout")
    top_k = int(gate.top_k)
    kw: dict = {"activation": _activation(experts.act_fn, "experts")}
    routing = _ROUTING[fam]
    bias = None
    if routing == "softmax_renorm":
        kw["renormalize"] = True  # these routers always divide by the top-k sum
    elif routing == "softmax":
        kw["renormalize"] = bool(gate.norm_topk_prob)
    elif routing == "sigmoid_grouped":
        kw.update(
            routing=RoutingMethod.SIGMOID_GROUPED_TOPK, renormalize=bool(gate.norm_topk_prob), n_group=int(gate.num_group),
            topk_group=int(gate.topk_group), routed_scaling_factor=float(gate.routed_scaling_factor),
        )
        bias = gate.e_score_correction_bias
    else:  # sigmoid_bias: one group holding every expert is a plain top-k over sigmoid + bias
        kw.update(routing=RoutingMethod.SIGMOID_GROUPED_TOPK, renormalize=True, n_group=1, topk_group=1,
                  routed_scaling_factor=1.0)
        bias = block.e_score_correction_bias
    shared = _shared_mlp(block)
    if shared is not None:
        kw["shared_expert_intermediate_size"] = int(shared.gate_proj.out_features)
        kw["shared_expert_gate"] = getattr(block, "shared_expert_gate", None) is not None
        if _activation(shared.act_fn, "shared expert") != kw["activation"]:
            raise MoeCommValueError("from_hf: shared expert activation must match the experts', got a different one")

    # built on the meta device: no memory is allocated, every tensor is then replaced by the block's own
    moe = MoE(H, two_i // 2, E, top_k, dtype=w_gate_up.dtype, device="meta", **kw)
    moe.gate.weight = gate.weight
    moe.w_gate_up = w_gate_up
    moe.w_down = w_down
    if moe.e_score_correction_bias is not None:
        moe.e_score_correction_bias = bias
    if shared is not None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(moe.shared_experts, name).weight = getattr(shared, name).weight
        if moe.shared_expert_gate is not None:
            moe.shared_expert_gate.weight = block.shared_expert_gate.weight
    for name, t in list(moe.named_parameters()) + list(moe.named_buffers()):
        if t.device.type == "meta":  # a block variant we map but did not fill: fail here, not in forward
            raise MoeCommValueError(f"from_hf: {fam} has no tensor for MoE.{name}, got an unexpected block layout")
    return moe.train(block.training)


def patch_hf_model(model: nn.Module) -> int:
    """Replace, in place, every supported MoE block of a transformers model by a moecomm.MoE.

    Args:
        model: any nn.Module (a *ForCausalLM, a decoder layer, ...). Weights are shared with the
            replaced blocks, so no memory is added.

    Returns:
        the number of blocks replaced (0 when the model has none). The model still runs forward()
        and generate(). Router logits are no longer recorded (output_router_logits / the auxiliary
        load-balancing loss are training features the replacement does not provide).
    """
    if not isinstance(model, nn.Module):
        raise MoeCommTypeError(f"patch_hf_model: model must be a torch.nn.Module, got {type(model).__name__}")
    targets = [(name, mod) for name, mod in model.named_modules() if name and _family(mod) is not None]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, from_hf(mod))
    return len(targets)

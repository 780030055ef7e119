"""Hugging Face transformers integration: a transformers MoE block -> moecomm.MoE, in the block's layout.

# T = num_tokens, H = hidden, I = moe intermediate, E = num_experts, k = top_k

The supported blocks and their routing are the table moecomm/layer/hf/blocks.py (BLOCKS; its
docstring shows it as a table). Every one of those blocks' forward takes hidden_states [B, S, H]
and returns one tensor [B, S, H]; the replacement (an HFMoE, moecomm/layer/hf/patched.py) returns
the same. Weights are shared, not copied: the layer holds the block's own submodules and tensors
under the block's names, so a patched model's memory does not grow and its state_dict,
checkpoints and tp_plan are transformers' own.

A model's life with moecomm (see tests/hf/test_lifecycle.py):

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-30B-A3B", dtype=torch.bfloat16, device_map="cuda")
    moecomm.patch_hf_model(model)   # -> 48 (also on the meta device, before the weights are loaded)
    model.generate(...)             # or train: output_router_logits / the aux loss as transformers computes them
    model.save_pretrained(path)     # transformers' names and layout: loads into an unpatched model
    moecomm.unpatch_hf_model(model) # transformers' blocks back, holding the current weights
"""

from __future__ import annotations

import logging

from torch import nn

from ...errors import MoeCommError, MoeCommTypeError, MoeCommValueError
from ..config import MoEConfig
from . import experts
from .blocks import SUPPORTED_BLOCKS, BlockRow, find_row
from .patched import HFMoE

__all__ = ["SUPPORTED_BLOCKS", "from_hf", "patch_hf_model", "unpatch_hf_model"]

_log = logging.getLogger("moecomm")


def _family(block: nn.Module) -> str | None:
    """The supported class name a block is (or derives from), else None."""
    row = find_row(block)
    return None if row is None else row.block


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


def routes_beyond_kept_groups(block: nn.Module, row: BlockRow) -> bool:
    """Whether a grouped block picks more experts than its kept groups hold (top_k > topk_group * experts
    per group: transformers' own DeepSeek-V3 test config, top_k 8 of 8 experts in 2 groups, 1 kept). Its
    router then also takes experts it masked to -inf, in torch.topk's order among equal scores, which no
    grouped top-k rule reproduces; so the patched layer takes the routing from the block's router module
    itself (one call, its topk_ids and topk_weights) and computes the experts and the combine."""
    if not row.kind.grouped:
        return False
    gate, num_experts = block.gate, block.experts.gate_up_proj.shape[0]
    n_group, topk_group = int(gate.num_group), int(gate.topk_group)
    return n_group > 0 and num_experts % n_group == 0 and int(gate.top_k) > topk_group * (num_experts // n_group)


def block_config(block: nn.Module, row: BlockRow) -> MoEConfig:
    """The MoEConfig of what a block of that row computes, read off the block (any device, meta too)."""
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
    kind = row.kind
    kw: dict = {"activation": _activation(experts.act_fn, "experts"), "routing": kind.routing}
    kw["renormalize"] = True if kind.renormalize == "always" else bool(gate.norm_topk_prob)
    if kind.grouped:
        n_group, topk_group = int(gate.num_group), int(gate.topk_group)
        if routes_beyond_kept_groups(block, row):  # the block's router routes (HFMoE.routes_with_block_router)
            topk_group = n_group
        kw.update(n_group=n_group, topk_group=topk_group, routed_scaling_factor=float(gate.routed_scaling_factor))
    elif kind.bias == "block":  # one group holding every expert: a plain top-k over sigmoid + bias
        kw.update(n_group=1, topk_group=1)
    shared = getattr(block, row.shared_name, None) if row.shared_name else None
    if shared is not None:
        kw["shared_expert_intermediate_size"] = int(shared.gate_proj.out_features)
        kw["shared_expert_gate"] = row.shared_gate and getattr(block, "shared_expert_gate", None) is not None
        if _activation(shared.act_fn, "shared expert") != kw["activation"]:
            raise MoeCommValueError("from_hf: shared expert activation must match the experts', got a different one")
    return MoEConfig(H, two_i // 2, E, int(gate.top_k), **kw)


def from_hf(block: nn.Module) -> HFMoE:
    """Build a moecomm.MoE computing what a transformers MoE block computes, holding the block's tensors.

    Args:
        block: one of SUPPORTED_BLOCKS (transformers >= 5; moecomm/layer/hf/blocks.py lists their
            routing), on any device (meta too), in float32, bfloat16 or float16. Its submodules and
            Parameters are reused, not copied, under their transformers names.

    Returns:
        an HFMoE (a moecomm.MoE) in the block's train/eval mode; forward(x [B, S, H]) -> [B, S, H];
        its state_dict is the block's.

    Raises:
        MoeCommTypeError: the block is of another type (the message lists the supported ones), or
            its dtype is not one MoE supports.
        MoeCommValueError: a layout or a config moecomm does not compute (a float64 block, biased experts,
            say); patch_hf_model leaves such blocks as they are. A grouped block picking more experts than
            its kept groups hold is computed, routed by its own router (routes_beyond_kept_groups).

    Example:
        >>> moe = moecomm.from_hf(model.model.layers[0].mlp)
        >>> torch.testing.assert_close(moe(x), model.model.layers[0].mlp(x))
    """
    row = find_row(block)
    if row is None:
        raise MoeCommTypeError(f"from_hf: block must be one of {', '.join(SUPPORTED_BLOCKS)}, got {type(block).__name__}")
    config = block_config(block, row)
    w = block.experts.gate_up_proj
    return HFMoE(block, row, config, dtype=w.dtype, device=w.device,
                 routes_with_block_router=routes_beyond_kept_groups(block, row))


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def patch_hf_model(model: nn.Module) -> int:
    """Replace, in place, every supported MoE block of a transformers model by a moecomm.MoE.

    Args:
        model: any nn.Module (a *ForCausalLM, a decoder layer, ...), on any device, the meta device
            too (patch, then load the weights). Weights are shared with the replaced blocks.

    Returns:
        the number of blocks replaced (0 when the model has none). The model keeps its state_dict
        names, forward(), generate(), output_router_logits and the aux loss. A supported block whose
        config moecomm does not compute is left as transformers' block, with one warning line per
        reason on the "moecomm" logger; patch_hf_model itself never raises for a block.
    """
    if not isinstance(model, nn.Module):
        raise MoeCommTypeError(f"patch_hf_model: model must be a torch.nn.Module, got {type(model).__name__}")
    targets = [(name, mod) for name, mod in model.named_modules() if name and find_row(mod) is not None]
    left: dict[str, list[str]] = {}
    for name, mod in targets:
        try:
            moe = from_hf(mod)
        except MoeCommError as exc:
            left.setdefault(f"{type(mod).__name__}: {exc}", []).append(name)
            continue
        parent, attr = _parent(model, name)
        setattr(parent, attr, moe)
    replaced = [m for m in model.modules() if isinstance(m, HFMoE) and not m.follows_experts_implementation]
    # transformers now reports "moecomm", generate() leaves it alone, and a later choice is honoured
    if replaced and not left and _set_experts_implementation(model, experts.NAME):
        for moe in replaced:
            moe.follows_experts_implementation = True
    for why, names in left.items():
        _log.warning("moecomm.patch_hf_model: left %d block(s) as transformers' own (%s%s), because %s", len(names),
                     ", ".join(names[:3]), ", ..." if len(names) > 3 else "", why)
    return len(targets) - sum(map(len, left.values()))


def unpatch_hf_model(model: nn.Module) -> int:
    """Undo patch_hf_model: put transformers' blocks back, holding the layers' current weights.

    Returns the number of blocks restored. Weights are not copied: after fine-tuning, .to() or a
    load, the restored blocks hold the same tensors the patched model held.
    """
    if not isinstance(model, nn.Module):
        raise MoeCommTypeError(f"unpatch_hf_model: model must be a torch.nn.Module, got {type(model).__name__}")
    targets = [(name, mod) for name, mod in model.named_modules() if name and isinstance(mod, HFMoE)]
    for name, mod in targets:
        parent, attr = _parent(model, name)
        setattr(parent, attr, mod.restore())
    if targets and targets[0][1].experts_implementation_before is not None:
        _set_experts_implementation(model, targets[0][1].experts_implementation_before)
    return len(targets)


def _set_experts_implementation(model: nn.Module, name: str) -> bool:
    """model.set_experts_implementation(name) where model is a transformers model that has the knob."""
    setter = getattr(model, "set_experts_implementation", None)
    if setter is None or not experts.register():
        return False
    try:
        setter(name)
    except (ValueError, RuntimeError, KeyError) as exc:  # a model whose knob is locked (deepgemm_megamoe)
        _log.warning("moecomm.patch_hf_model: experts implementation left as it was (%s)", exc)
        return False
    return True

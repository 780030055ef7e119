"""The transformers MoE blocks moecomm replaces: one table, read by from_hf, SUPPORTED_BLOCKS and the docs.

# H = hidden, I = moe intermediate, E = num_experts, k = top_k

Every block (transformers 5.x layout: experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I])
is one row of BLOCKS: its class name, the model family's name, its kind (how its router routes) and
its shared expert. A new model family is one row here plus its config in tests/hf/test_hf.py, which
checks each row against the real block class. The table below is rendered from BLOCKS by
render_table(); tests/hf/test_blocks.py fails when the two differ (print the new one with
``python -m moecomm.layer.hf.blocks``).

<!-- BLOCKS:begin -->
| routing | blocks |
|---|---|
| softmax top-k, always renormalised | Mixtral, MiniMax-Text-01, Qwen3.5-MoE (g), Qwen3-VL-MoE (text) |
| softmax top-k, renormalised if gate.norm_topk_prob | Qwen2-MoE (g), Qwen3-MoE, Qwen3-Next (g), Qwen3-Omni-MoE thinker, Qwen3-Omni-MoE talker (g), Qwen4Exp (g), OLMoE, FlexOlmo, Mellum |
| sigmoid + gate.e_score_correction_bias, grouped top-k (gate.num_group, gate.topk_group), renormalised if gate.norm_topk_prob, x gate.routed_scaling_factor | DeepSeek-V3 (s), DeepSeek-V3.2 (s), GLM-4.5 (Glm4Moe) (s), Glm4vMoe (text) (s), Glm4MoeLite (s), GlmMoeDsa (s), dots.llm1 (Dots1) (s), Kimi-Linear (s), SolarOpen (s), ExaoneMoe (s), MiMo-V2-Flash |
| sigmoid + the block's e_score_correction_bias, top-k over all experts, always renormalised | MiniMax-M2 |

(g): a shared expert `shared_expert`, scaled per token by sigmoid(`shared_expert_gate`(x)).
(s): shared experts `shared_experts` (n_shared_experts fused into one MLP), added unscaled.
<!-- BLOCKS:end -->
"""

from __future__ import annotations

import dataclasses

from ...routing import RoutingMethod

__all__ = ["BLOCKS", "BlockKind", "BlockRow", "SUPPORTED_BLOCKS", "find_row", "render_table"]


@dataclasses.dataclass(frozen=True)
class BlockKind:
    """How one kind of block routes, and where its router's settings are read.

    Attributes:
        doc: the kind's line in the docs table.
        routing: the RoutingMethod that computes it.
        renormalize: "always", or "norm_topk_prob" (read from the block's gate).
        grouped: the gate holds num_group, topk_group, routed_scaling_factor (DeepSeek-V3's router).
        bias: who holds e_score_correction_bias: "gate", "block" (passed to the gate as its second
            argument), or None.
    """

    doc: str
    routing: RoutingMethod
    renormalize: str
    grouped: bool = False
    bias: str | None = None


SOFTMAX_RENORM = BlockKind("softmax top-k, always renormalised", RoutingMethod.SOFTMAX_TOPK, "always")
SOFTMAX = BlockKind("softmax top-k, renormalised if gate.norm_topk_prob", RoutingMethod.SOFTMAX_TOPK, "norm_topk_prob")
SIGMOID_GROUPED = BlockKind(
    "sigmoid + gate.e_score_correction_bias, grouped top-k (gate.num_group, gate.topk_group), renormalised if "
    "gate.norm_topk_prob, x gate.routed_scaling_factor",
    RoutingMethod.SIGMOID_GROUPED_TOPK, "norm_topk_prob", grouped=True, bias="gate",
)
SIGMOID_BIAS = BlockKind(
    "sigmoid + the block's e_score_correction_bias, top-k over all experts, always renormalised",
    RoutingMethod.SIGMOID_GROUPED_TOPK, "always", bias="block",
)
KINDS = (SOFTMAX_RENORM, SOFTMAX, SIGMOID_GROUPED, SIGMOID_BIAS)

# the shared expert of a row: its submodule's name, and whether a sigmoid gate scales it
SHARED = {"": (None, False), "g": ("shared_expert", True), "s": ("shared_experts", False)}
_SHARED_DOC = {
    "g": "a shared expert `shared_expert`, scaled per token by sigmoid(`shared_expert_gate`(x))",
    "s": "shared experts `shared_experts` (n_shared_experts fused into one MLP), added unscaled",
}


@dataclasses.dataclass(frozen=True)
class BlockRow:
    """One supported transformers block class.

    Attributes:
        block: the class name (matched along a block's MRO, so subclasses are recognised).
        model: the family's name in the docs.
        kind: its BlockKind.
        shared: "" (none), "g" (gated shared_expert), "s" (shared_experts); see SHARED.
    """

    block: str
    model: str
    kind: BlockKind
    shared: str = ""

    @property
    def shared_name(self) -> str | None:
        return SHARED[self.shared][0]

    @property
    def shared_gate(self) -> bool:
        return SHARED[self.shared][1]


BLOCKS = (
    BlockRow("MixtralSparseMoeBlock", "Mixtral", SOFTMAX_RENORM),
    BlockRow("MiniMaxSparseMoeBlock", "MiniMax-Text-01", SOFTMAX_RENORM),
    BlockRow("Qwen3_5MoeSparseMoeBlock", "Qwen3.5-MoE", SOFTMAX_RENORM, "g"),
    BlockRow("Qwen3VLMoeTextSparseMoeBlock", "Qwen3-VL-MoE (text)", SOFTMAX_RENORM),
    BlockRow("Qwen2MoeSparseMoeBlock", "Qwen2-MoE", SOFTMAX, "g"),
    BlockRow("Qwen3MoeSparseMoeBlock", "Qwen3-MoE", SOFTMAX),
    BlockRow("Qwen3NextSparseMoeBlock", "Qwen3-Next", SOFTMAX, "g"),
    BlockRow("Qwen3OmniMoeThinkerTextSparseMoeBlock", "Qwen3-Omni-MoE thinker", SOFTMAX),
    BlockRow("Qwen3OmniMoeTalkerTextSparseMoeBlock", "Qwen3-Omni-MoE talker", SOFTMAX, "g"),
    BlockRow("Qwen4ExpTextSparseMoeBlock", "Qwen4Exp", SOFTMAX, "g"),
    BlockRow("OlmoeSparseMoeBlock", "OLMoE", SOFTMAX),
    BlockRow("FlexOlmoSparseMoeBlock", "FlexOlmo", SOFTMAX),
    BlockRow("MellumSparseMoeBlock", "Mellum", SOFTMAX),
    BlockRow("DeepseekV3MoE", "DeepSeek-V3", SIGMOID_GROUPED, "s"),
    BlockRow("DeepseekV32MoE", "DeepSeek-V3.2", SIGMOID_GROUPED, "s"),
    BlockRow("Glm4MoeMoE", "GLM-4.5 (Glm4Moe)", SIGMOID_GROUPED, "s"),
    BlockRow("Glm4vMoeTextMoE", "Glm4vMoe (text)", SIGMOID_GROUPED, "s"),
    BlockRow("Glm4MoeLiteMoE", "Glm4MoeLite", SIGMOID_GROUPED, "s"),
    BlockRow("GlmMoeDsaMoE", "GlmMoeDsa", SIGMOID_GROUPED, "s"),
    BlockRow("Dots1MoE", "dots.llm1 (Dots1)", SIGMOID_GROUPED, "s"),
    BlockRow("KimiLinearMoE", "Kimi-Linear", SIGMOID_GROUPED, "s"),
    BlockRow("SolarOpenMoE", "SolarOpen", SIGMOID_GROUPED, "s"),
    BlockRow("ExaoneMoeSparseMoEBlock", "ExaoneMoe", SIGMOID_GROUPED, "s"),
    BlockRow("MiMoV2FlashMoE", "MiMo-V2-Flash", SIGMOID_GROUPED),
    BlockRow("MiniMaxM2SparseMoeBlock", "MiniMax-M2", SIGMOID_BIAS),
)
_BY_NAME = {row.block: row for row in BLOCKS}
SUPPORTED_BLOCKS = tuple(_BY_NAME)


def find_row(module) -> BlockRow | None:
    """The row of a module's class or of its nearest listed base class (a fine-tuned variant's block);
    None for any other module. No transformers module is imported: classes are matched by name."""
    for cls in type(module).__mro__:
        row = _BY_NAME.get(cls.__name__)
        if row is not None:
            return row
    return None


def render_table() -> str:
    """The docs table of BLOCKS (markdown), one line per kind, as the module docstring holds it."""
    lines = ["| routing | blocks |", "|---|---|"]
    for kind in KINDS:
        rows = [r for r in BLOCKS if r.kind is kind]
        lines.append(f"| {kind.doc} | " + ", ".join(r.model + (f" ({r.shared})" if r.shared else "") for r in rows) + " |")
    lines.append("")
    lines += [f"({key}): {doc}." for key, doc in _SHARED_DOC.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_table())

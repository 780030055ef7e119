"""moecomm.from_hf / patch_hf_model against the real transformers classes (tiny random configs, CPU).

# B = batch, S = sequence, H = hidden (64), E = experts (8), k = top_k (2)

fp32: the block and the MoE compute the same sums in a different order: 1e-5 relative to the
    output's magnitude (fp32 eps 1.2e-7 times depth 64 and a few terms, with margin).
bf16: both are compared with the block run in fp32 on the same weights; ours must be no worse than
    the block's own bf16 error (x1.5 + 1 bf16 ulp of the output's scale, for rounding order).
"""

from __future__ import annotations

import pytest
import torch

import moecomm
from moecomm.errors import MoeCommTypeError
from moecomm.layer.hf.convert import SUPPORTED_BLOCKS, _family, _shared_mlp

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
              max_position_embeddings=128, initializer_range=0.1)


_DS = dict(intermediate_size=48, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
           topk_group=2, n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=2.5, norm_topk_prob=True)
_MLA = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
_LINEAR = dict(head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
               layer_types=["linear_attention", "full_attention"])
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary


def _config(family: str):
    """A tiny config of that family: hidden 64, 8 experts, top-2, every layer an MoE layer."""
    t = transformers
    builders = {
        "mixtral": lambda: t.MixtralConfig(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, **COMMON),
        # shared expert with its sigmoid gate; no renormalisation
        "qwen2_moe": lambda: t.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                                              num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, **COMMON),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                              norm_topk_prob=True, head_dim=16, **COMMON),
        "qwen3_next": lambda: t.Qwen3NextConfig(intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                                                num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, **_LINEAR, **COMMON),
        "qwen3_5_moe": lambda: t.Qwen3_5MoeTextConfig(moe_intermediate_size=32, shared_expert_intermediate_size=40, num_experts=8,
                                                      num_experts_per_tok=2, **_LINEAR, **COMMON),
        "qwen3_vl_moe": lambda: t.Qwen3VLMoeTextConfig(intermediate_size=48, moe_intermediate_size=32, num_local_experts=8,
                                                       num_experts_per_tok=2, head_dim=16, **COMMON),
        "olmoe": lambda: t.OlmoeConfig(intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, **COMMON),
        "flex_olmo": lambda: t.FlexOlmoConfig(intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                              **_TOKENS, **COMMON),
        "mellum": lambda: t.MellumConfig(intermediate_size=48, moe_intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=False, head_dim=16, **COMMON),
        # DeepSeek-V3 and its kin: 4 groups of 2 experts, 2 groups kept, scaled weights, one shared expert
        "deepseek_v3": lambda: t.DeepseekV3Config(**_DS, **_MLA, **COMMON),
        "deepseek_v32": lambda: t.DeepseekV32Config(**_DS, **dict(_MLA, q_lora_rank=16), **COMMON),
        "glm4_moe": lambda: t.Glm4MoeConfig(**_DS, **COMMON),
        "glm4v_moe": lambda: t.Glm4vMoeTextConfig(**_DS, **COMMON),
        "glm4_moe_lite": lambda: t.Glm4MoeLiteConfig(**_DS, **_MLA, mlp_layer_types=["sparse", "sparse"], **COMMON),
        "dots1": lambda: t.Dots1Config(**_DS, **COMMON),
        "solar_open": lambda: t.SolarOpenConfig(**_DS, head_dim=16, **COMMON),
        "kimi_linear": lambda: t.KimiLinearConfig(
            intermediate_size=48, moe_intermediate_size=32, num_experts=8, num_experts_per_token=2, num_expert_group=4,
            topk_group=2, num_shared_experts=1, routed_scaling_factor=2.5, moe_renormalize=True, **_MLA,
            layer_types=["linear_attention", "full_attention"], mlp_layer_types=["sparse", "sparse"], linear_head_dim=16,
            linear_num_heads=4, **_TOKENS, **COMMON),
        # sigmoid + a bias held by the block, plain top-k, always renormalised
        "minimax_m2": lambda: t.MiniMaxM2Config(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                                                **COMMON),
        "minimax": lambda: t.MiniMaxConfig(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                                           **COMMON),
        "qwen3_omni_moe_thinker": lambda: t.Qwen3OmniMoeTextConfig(
            intermediate_size=48, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
            head_dim=16, **COMMON),
        "qwen3_omni_moe_talker": lambda: t.Qwen3OmniMoeTalkerTextConfig(
            intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=40, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, head_dim=16, **COMMON),
        "qwen4_exp": lambda: t.Qwen4ExpTextConfig(moe_intermediate_size=32, shared_expert_intermediate_size=40, num_experts=8,
                                                  num_experts_per_tok=2, norm_topk_prob=False, head_dim=16, **COMMON),
        "glm_moe_dsa": lambda: t.GlmMoeDsaConfig(**_DS, **COMMON),
        "mimo_v2_flash": lambda: t.MiMoV2FlashConfig(**_DS, **COMMON),
        "exaone_moe": lambda: t.ExaoneMoeConfig(**_DS, **COMMON),
    }
    return builders[family]()


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_vl_moe", "olmoe", "flex_olmo", "mellum",
            "deepseek_v3", "deepseek_v32", "glm4_moe", "glm4v_moe", "glm4_moe_lite", "dots1", "solar_open", "kimi_linear",
            "minimax_m2", "minimax", "qwen3_omni_moe_thinker", "qwen3_omni_moe_talker", "qwen4_exp", "glm_moe_dsa",
            "mimo_v2_flash", "exaone_moe"]
# family -> (transformers module, block class), tested as blocks built from the family's config: no
# causal-LM class for a text config (the VL and Omni models), or none that runs at this tiny size
BLOCK_ONLY = {
    "qwen3_vl_moe": ("qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock"),
    "glm4v_moe": ("glm4v_moe", "Glm4vMoeTextMoE"),
    "deepseek_v32": ("deepseek_v32", "DeepseekV32MoE"),
    "qwen3_omni_moe_thinker": ("qwen3_omni_moe", "Qwen3OmniMoeThinkerTextSparseMoeBlock"),
    "qwen3_omni_moe_talker": ("qwen3_omni_moe", "Qwen3OmniMoeTalkerTextSparseMoeBlock"),
    "qwen4_exp": ("qwen4_exp", "Qwen4ExpTextSparseMoeBlock"),
    "glm_moe_dsa": ("glm_moe_dsa", "GlmMoeDsaMoE"),
    "mimo_v2_flash": ("mimo_v2_flash", "MiMoV2FlashMoE"),
    "exaone_moe": ("exaone_moe", "ExaoneMoeSparseMoEBlock"),
}


def _spread_routing(mod):
    """The blocks' default init makes near-uniform routing; spread it so the top-k is clear."""
    mod.gate.weight.normal_(0, 0.3)
    for owner in (mod.gate, mod):
        if isinstance(getattr(owner, "e_score_correction_bias", None), torch.Tensor):
            owner.e_score_correction_bias.normal_(0, 0.1)


def _model(family: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family)).eval()
    with torch.no_grad():
        for mod in model.modules():
            if _family(mod) is not None:
                _spread_routing(mod)
    return model


def _first_block(model):
    return next(m for m in model.modules() if _family(m) is not None)


@torch.no_grad()
def _block(family: str):
    """The family's first MoE block, with its weights drawn (std 0.1) and its routing spread."""
    if family not in BLOCK_ONLY:
        return _first_block(_model(family))
    import importlib

    torch.manual_seed(0)
    module_name, block_name = BLOCK_ONLY[family]
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    block = getattr(module, block_name)(_config(family)).eval()
    for p in block.parameters():
        p.normal_(0, 0.1)
    _spread_routing(block)
    return block


def test_every_supported_block_is_tested():
    """Each class in SUPPORTED_BLOCKS is the MoE block of one family tested here."""
    seen = {type(_block(f)).__name__ for f in FAMILIES}
    assert seen == set(SUPPORTED_BLOCKS)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_block_fp32_matches_and_shares_weights(family):
    block = _block(family)
    moe = moecomm.from_hf(block)
    for shape in [(2, 7, 64), (1, 1, 64), (1, 33, 64)]:
        x = torch.randn(shape)
        want = block(x)
        got = moe(x)
        assert type(got) is type(want) and got.shape == want.shape
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=1e-5)
    assert moe.w_gate_up.data_ptr() == block.experts.gate_up_proj.data_ptr()
    assert moe.w_down.data_ptr() == block.experts.down_proj.data_ptr()
    assert moe.gate.weight.data_ptr() == block.gate.weight.data_ptr()
    shared = _shared_mlp(block)
    if shared is not None:
        assert moe.shared_experts.down_proj.weight.data_ptr() == shared.down_proj.weight.data_ptr()
    if moe.e_score_correction_bias is not None:
        owner = block if family == "minimax_m2" else block.gate
        assert moe.e_score_correction_bias.data_ptr() == owner.e_score_correction_bias.data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_block_bf16_no_worse_than_the_block(family):
    block = _block(family)
    x = torch.randn(2, 9, 64)
    truth = block(x)  # fp32
    block = block.to(torch.bfloat16)
    moe = moecomm.from_hf(block)
    xb = x.bfloat16()
    err_block = (block(xb).float() - truth).abs().max().item()
    err_ours = (moe(xb).float() - truth).abs().max().item()
    ulp = truth.abs().max().item() * 2**-8
    assert err_ours <= 1.5 * err_block + ulp, (err_ours, err_block)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in BLOCK_ONLY])
@torch.no_grad()
def test_patched_model_generates_the_same_tokens(family):
    model = _model(family)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert moecomm.patch_hf_model(model) == 2
    assert sum(isinstance(m, moecomm.MoE) for m in model.modules()) == 2
    assert moecomm.patch_hf_model(model) == 0  # nothing left to replace
    got = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_unknown_block_type_lists_the_supported_ones():
    with pytest.raises(MoeCommTypeError) as info:
        moecomm.from_hf(torch.nn.Linear(4, 4))
    msg = str(info.value)
    assert msg.startswith("from_hf: block must be one of") and msg.endswith("got Linear")
    assert all(name in msg for name in SUPPORTED_BLOCKS)
    with pytest.raises(MoeCommTypeError, match="patch_hf_model: model must be a torch.nn.Module, got str"):
        moecomm.patch_hf_model("model")


def test_patch_model_without_moe_blocks_returns_zero():
    assert moecomm.patch_hf_model(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@torch.no_grad()
def test_gpu_bf16_real_block_shapes(family):
    """One block at the Mixtral-8x7B / Qwen3-30B-A3B size on the GPU: ours vs the block (grouped_mm)."""
    from benchmarks.bench_moe import SHAPES, _hf_block, _set_impl

    H, I, E, k, fam = SHAPES["mixtral_8x7b" if family == "mixtral" else "qwen3_30b_a3b"]
    torch.manual_seed(0)
    block = _hf_block(fam, H, I, E, k, torch.bfloat16, "cuda")
    _set_impl(block, "grouped_mm")
    moe = moecomm.from_hf(block)
    x = torch.randn(1, 256, H, device="cuda", dtype=torch.bfloat16)
    want, got = block(x).float(), moe(x).float()
    # both round to bf16 (2^-8) in different places; near-tie routing may differ for a few tokens
    bad = ((got - want).abs() > 3e-2 * (1 + want.abs())).any(dim=-1)
    assert bad.float().mean().item() <= 1e-2, f"{int(bad.sum())} of {bad.numel()} tokens differ"


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "glm4_moe", "minimax_m2"])
@torch.no_grad()
def test_gpu_patched_model_generates_the_same_tokens_from_graphs(family):
    """Greedy decoding on the GPU in fp32: every decode step of a patched layer (2 tokens, one per
    sequence) replays the CUDA graph it captured at the second step, and the tokens stay the same."""
    model = _model(family).cuda()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(ids)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert moecomm.patch_hf_model(model) == 2
    got = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    layers = [m for m in model.modules() if isinstance(m, moecomm.MoE)]
    assert all(m.graphs.captures >= 1 for m in layers)  # T=2 decode steps (and the T=12 prefill, seen once: not captured)

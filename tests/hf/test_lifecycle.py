"""A patched transformers model through its whole life (issue 11): build or load, patch (on the meta
device too), train with router logits and gradient checkpointing, move and cast, save, reload, unpatch.

# B = batch, S = sequence, H = hidden (64), E = experts (8), k = top_k (2)

Tiny random configs of tests/hf/test_hf.py, CPU, fp32. Tolerances: the loss and the gradients of the
patched model sum the same fp32 products in another order than transformers' eager experts: 1e-5
relative to each gradient's largest entry (fp32 eps 1.2e-7 x depth ~64 x a few layers, with margin).
The router logits come from the block's own router module: layer 0's are equal bit for bit, the
next layer's (and the aux loss) within the fp32 tolerance above, as its input passed our experts.
Weights moved by save / load / unpatch are compared exactly.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import moecomm
from moecomm.layer.hf import HFMoE

transformers = pytest.importorskip("transformers")
from test_hf import _config, _model  # noqa: E402  (tests/hf is on sys.path under pytest's rootdir conftest)

# Mixtral (softmax, jitter attr), Qwen2-MoE (gated shared expert), OLMoE, DeepSeek-V3 (grouped, bias on
# the gate, shared experts), MiniMax-M2 (bias on the block, passed to its router)
FAMILIES = ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "minimax_m2"]
AUX = ["mixtral", "qwen2_moe", "olmoe", "minimax_m2"]  # their causal LMs add the load-balancing loss


def _ids(seed=0, shape=(2, 9)):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def _patched(family):
    ref = _model(family)
    pat = copy.deepcopy(ref)
    assert moecomm.patch_hf_model(pat) == 2
    return ref, pat


def _generate(model, ids):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)


# ----------------------------------------------------------------------------- names and checkpoints
@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_is_transformers_own(family):
    """Same keys, same tensors (storage) as the unpatched model: mlp.experts.gate_up_proj etc."""
    ref, pat = _patched(family)
    want, got = ref.state_dict(), pat.state_dict()
    assert list(got) == list(want)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want)
    moe = pat.model.layers[0].mlp
    assert isinstance(moe, moecomm.MoE) and moe.w_gate_up is moe.experts.gate_up_proj
    assert dict(moe.named_parameters()).keys() == dict(ref.model.layers[0].mlp.named_parameters()).keys()
    # load_state_dict round trip, strict, into a patched model with other weights
    other = _model(family)
    moecomm.patch_hf_model(other)
    other.load_state_dict(want)
    assert all(torch.equal(other.state_dict()[k], want[k]) for k in want)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
@torch.no_grad()
def test_save_pretrained_and_from_pretrained_both_ways(family, tmp_path):
    """Before: the patched model saved mlp.w_gate_up / mlp.w_down, and from_pretrained re-initialised the
    experts silently. Now its checkpoint (safetensors) loads into an unpatched model with nothing
    missing, bit-identical; an unpatched checkpoint loads into a model that is then patched."""
    ref, pat = _patched(family)
    with torch.no_grad():
        pat.model.layers[0].mlp.w_gate_up.add_(0.01)  # a "fine-tuned" expert: must survive the round trip
    pat.save_pretrained(tmp_path / "patched")
    assert (tmp_path / "patched" / "model.safetensors").exists()
    cls = type(ref)
    back, info = cls.from_pretrained(tmp_path / "patched", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    sd = pat.state_dict()
    assert all(torch.equal(back.state_dict()[k], sd[k]) for k in sd)

    ref.save_pretrained(tmp_path / "plain")
    loaded = cls.from_pretrained(tmp_path / "plain").eval()
    assert moecomm.patch_hf_model(loaded) == 2
    ids = _ids()
    assert torch.equal(_generate(loaded, ids), _generate(ref, ids))
    # on disk, transformers converts to its checkpoint layout (per-expert tensors for these families):
    # the patched model's file has the unpatched one's keys, so the conversion saw transformers' names
    from safetensors.torch import load_file

    assert load_file(tmp_path / "patched" / "model.safetensors").keys() == load_file(tmp_path / "plain" / "model.safetensors").keys()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_patch_on_meta_then_load_the_weights(family):
    """Before: 'from_hf: ... has no tensor for MoE.w_gate_up'. Patching on meta allocates nothing;
    load_state_dict(assign=True) puts the real tensors in, used as they are (no second copy)."""
    ref = _model(family)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(_config(family))
    assert moecomm.patch_hf_model(model) == 2
    assert model.model.layers[0].mlp.w_gate_up.is_meta
    sd = ref.state_dict()
    model.load_state_dict(sd, assign=True)
    model.eval()
    moe = model.model.layers[1].mlp
    assert moe.w_gate_up.data_ptr() == sd["model.layers.1.mlp.experts.gate_up_proj"].data_ptr()
    for name, buf in model.named_buffers():  # rotary inv_freq is not in the state_dict: recompute it
        if buf.is_meta:
            owner = model.get_submodule(name.rpartition(".")[0])
            owner.inv_freq = ref.get_submodule(name.rpartition(".")[0]).inv_freq.clone()
            owner.original_inv_freq = owner.inv_freq.clone()
    ids = _ids()
    assert torch.equal(_generate(model, ids), _generate(ref, ids))


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_bf16"])
@torch.no_grad()
def test_casts_after_patching(cast):
    ref, pat = _patched("qwen2_moe")
    x = torch.randn(2, 5, 64)
    for m in (ref, pat):
        if cast == "to_bf16":
            m.to(torch.bfloat16)
        else:
            getattr(m, cast)()
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    moe = pat.model.layers[0].mlp
    assert moe.w_gate_up.dtype == dtype and moe.shared_experts.gate_proj.weight.dtype == dtype
    block = ref.model.layers[0].mlp
    want, got = block(x.to(dtype)).float(), moe(x.to(dtype)).float()
    # both round to 16 bits in different places: a few ulps of the output's scale
    ulp = want.abs().max().item() * (2**-10 if dtype == torch.float16 else 2**-7)
    assert (got - want).abs().max().item() <= 4 * ulp


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("family", AUX)
@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
def test_router_logits_aux_loss_and_backward_match(family, checkpointing):
    """Before: IndexError in transformers' load-balancing loss (no router logits recorded)."""
    ref, pat = _patched(family)
    results = []
    for m in (ref, pat):
        m.train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        torch.manual_seed(0)
        ids = _ids()
        out = m(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (want, gw), (got, gg) = results
    assert len(got.router_logits) == len(want.router_logits) == 2
    # layer 0's router sees the same input: equal bit for bit; later layers see the MoE's output above
    assert torch.equal(got.router_logits[0], want.router_logits[0])
    torch.testing.assert_close(got.router_logits[1], want.router_logits[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    assert gg.keys() == gw.keys() and any("experts.gate_up_proj" in k for k in gg)
    for k in gw:
        scale = gw[k].abs().max().item() + 1e-12
        assert (gg[k] - gw[k]).abs().max().item() <= 1e-5 * scale, k


@torch.no_grad()
def test_mixtral_jitter_noise_is_applied_as_the_block_does():
    ref = _model("mixtral")
    for layer in ref.model.layers:
        layer.mlp.jitter_noise = 0.1
    pat = copy.deepcopy(ref)
    moecomm.patch_hf_model(pat)
    ref.train(), pat.train()
    x = torch.randn(2, 5, 64)
    torch.manual_seed(3)
    want = ref.model.layers[0].mlp(x.clone())  # the block scales its input in place
    torch.manual_seed(3)
    got = pat.model.layers[0].mlp(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- configs we do not compute
@torch.no_grad()
@pytest.mark.parametrize("n_group, topk_group, top_k", [(4, 1, 4), (2, 1, 8)])  # the second: transformers' test config
def test_deepseek_config_beyond_the_kept_groups_is_routed_by_the_blocks_router(n_group, topk_group, top_k):
    """transformers' own DeepSeek-V3 test config picks more experts than its kept groups hold (its router
    then takes -inf-masked experts in torch.topk's order among equal scores): before, patch_hf_model raised
    in MoE.__init__, then left the blocks unpatched; now the layer routes with the block's router module
    and computes the rest, as transformers does."""
    cfg = _config("deepseek_v3")
    cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok = n_group, topk_group, top_k
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    for mod in model.modules():
        if hasattr(mod, "e_score_correction_bias") and hasattr(mod, "weight"):
            mod.weight.normal_(0, 0.3)
    ids = _ids()
    want = model(ids).logits
    assert moecomm.patch_hf_model(model) == 2
    layers = [m for m in model.modules() if isinstance(m, HFMoE)]
    assert len(layers) == 2 and all(m.routes_with_block_router for m in layers)
    got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


def test_float64_model_is_left_unpatched(caplog):
    model = _model("olmoe").double()
    with caplog.at_level(logging.WARNING, logger="moecomm"):
        assert moecomm.patch_hf_model(model) == 0
    assert "dtype must be float32 or bfloat16 or float16, got float64" in caplog.text


# ----------------------------------------------------------------------------- unpatch
@pytest.mark.parametrize("family", ["qwen2_moe", "minimax_m2"])
def test_unpatch_restores_transformers_blocks_with_the_current_weights(family):
    ref, pat = _patched(family)
    block_cls = type(ref.model.layers[0].mlp)
    # fine-tune one step and cast: the restored blocks must hold the weights as they are now
    pat.train()
    ids = _ids()
    pat(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in pat.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    pat.bfloat16()
    sd = {k: v.clone() for k, v in pat.state_dict().items()}
    assert moecomm.unpatch_hf_model(pat) == 2
    assert moecomm.unpatch_hf_model(pat) == 0
    assert not any(isinstance(m, HFMoE) for m in pat.modules())
    assert all(type(layer.mlp) is block_cls for layer in pat.model.layers)
    got = pat.state_dict()
    assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert pat.model.layers[0].mlp.training  # its mode too
    # and it runs as transformers' block again, the same function of the same weights
    pat.eval()
    with torch.no_grad():
        again = copy.deepcopy(pat)
        moecomm.patch_hf_model(again)
        x = torch.randn(1, 4, 64, dtype=torch.bfloat16)
        want, have = pat.model.layers[1].mlp(x).float(), again.model.layers[1].mlp(x).float()
        assert (have - want).abs().max().item() <= 4 * want.abs().max().item() * 2**-7


def test_unpatch_checks_its_argument():
    from moecomm.errors import MoeCommTypeError

    with pytest.raises(MoeCommTypeError, match="unpatch_hf_model: model must be a torch.nn.Module, got int"):
        moecomm.unpatch_hf_model(3)


# ----------------------------------------------------------------------------- transformers' knobs
@torch.no_grad()
def test_experts_implementation_knob_keeps_working_on_a_patched_model():
    """patch_hf_model sets the knob to "moecomm"; another choice runs transformers' block with it;
    "moecomm" brings ours back; unpatch restores the knob."""
    ref, pat = _patched("qwen3_moe")
    before = ref.config._experts_implementation
    assert pat.config._experts_implementation == "moecomm"
    x = torch.randn(1, 5, 64)
    moe, block = pat.model.layers[0].mlp, ref.model.layers[0].mlp
    assert moe.runs_moecomm()
    for impl in ("eager", "batched_mm", "grouped_mm"):
        pat.set_experts_implementation(impl)
        ref.set_experts_implementation(impl)
        assert not moe.runs_moecomm()
        assert torch.equal(moe(x), block(x))  # transformers' own forward, that implementation
    pat.set_experts_implementation("moecomm")
    assert moe.runs_moecomm()
    ids = _ids()
    ref.set_experts_implementation(before)
    assert torch.equal(_generate(pat, ids), _generate(ref, ids))
    moecomm.unpatch_hf_model(pat)
    assert pat.config._experts_implementation == before


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
@torch.no_grad()
def test_moecomm_experts_implementation_on_an_unpatched_model(family):
    """experts_implementation="moecomm" without patching: transformers routes, our kernels run the experts."""
    ref = _model(family)
    ours = copy.deepcopy(ref)
    from moecomm.layer.hf import experts

    assert experts.register()
    ours.set_experts_implementation("moecomm")
    ids = _ids()
    want, got = ref(ids).logits, ours(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    assert not any(isinstance(m, moecomm.MoE) for m in ours.modules())


def test_tp_plan_names_exist_in_a_patched_model():
    """tp_plan="auto" shards by module/parameter name: every name the plan gives for the MoE blocks
    (mlp.experts.gate_up_proj, mlp.gate, ...) still names a module or parameter of the patched model."""
    import fnmatch

    for family in ("mixtral", "qwen3_moe", "deepseek_v3"):
        ref, pat = _patched(family)
        plan = getattr(ref.model, "_tp_plan", None) or ref.model.config.base_model_tp_plan or {}
        mlp_keys = [k for k in plan if ".mlp." in k]
        assert mlp_keys, (family, plan)
        def names(m):
            return {n for n, _ in m.named_modules()} | {n for n, _ in m.named_parameters()}

        before, after = names(ref.model), names(pat.model)
        used = [k for k in mlp_keys if any(fnmatch.fnmatch(n, k) for n in before)]  # the plan also names dense MLPs
        assert any("experts.gate_up_proj" in k for k in used), (family, used)
        for key in used:
            assert {n for n in before if fnmatch.fnmatch(n, key)} == {n for n in after if fnmatch.fnmatch(n, key)}, key


def test_patching_48_layers_on_meta_takes_under_a_second():
    """The Qwen3-30B-A3B config (48 MoE layers of 128 experts), built on the meta device."""
    import time

    cfg = transformers.Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                                      num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                      intermediate_size=6144, vocab_size=151936, norm_topk_prob=True)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    t0 = time.process_time()
    assert moecomm.patch_hf_model(model) == 48
    took = time.process_time() - t0
    assert took < 1.0, f"patching took {took:.2f} s of host time"


@pytest.mark.parametrize("family", ["qwen2_moe", "minimax_m2"])
@torch.no_grad()
def test_patched_block_traces_fullgraph(family):
    """torch.compile(fullgraph=True) traces a patched block (dynamo only: inductor's compile time
    is tests/layer's job), with and without a hook on its router (transformers' recorder)."""
    _, pat = _patched(family)
    moe = pat.model.layers[0].mlp
    x = torch.randn(1, 5, 64)
    want = moe(x)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(moe, fullgraph=True, backend="eager")(x), want, atol=1e-6, rtol=1e-6)
    seen = []
    handle = moe.gate.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(moe, fullgraph=True, backend="eager")(x), want, atol=1e-6, rtol=1e-6)
    finally:
        handle.remove()
    assert seen  # the router module ran, so a recorder would see its logits

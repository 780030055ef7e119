"""MoEConfig (the layer's configuration, frozen and validated once) and MoE's constructor errors.

# H = hidden, I = intermediate, E = num_experts, k = top_k
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moecomm.errors import MoeCommTypeError, MoeCommValueError, UnsupportedHardwareError
from moecomm.layer import MoE, MoEConfig
from moecomm.routing import RoutingMethod, route

SIG = RoutingMethod.SIGMOID_GROUPED_TOPK
H, I, E = 64, 32, 8


@torch.no_grad()
def test_from_config_builds_the_layer_the_keywords_build():
    kw = dict(routing=SIG, n_group=4, topk_group=2, renormalize=True, routed_scaling_factor=2.5,
              shared_expert_intermediate_size=16)
    cfg = MoEConfig(H, I, E, 3, **kw)
    torch.manual_seed(0)
    a = MoE(H, I, E, 3, **kw)
    torch.manual_seed(0)
    b = MoE.from_config(cfg)
    assert a.config == b.config == cfg
    assert {n: p.shape for n, p in a.state_dict().items()} == {n: p.shape for n, p in b.state_dict().items()}
    x = torch.randn(5, H)
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_config_is_frozen_holds_effective_values_and_revalidates_on_replace():
    cfg = MoEConfig(H, I, E, 2, routing=SIG)
    assert (cfg.n_group, cfg.topk_group) == (1, 1)  # one group: plain sigmoid top-k
    assert cfg.materialize_min_rows is None and MoEConfig(H, 4096, E, 2).materialize_min_rows == 4096
    assert isinstance(cfg.cuda_graph_tokens, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3
    with pytest.raises(MoeCommValueError, match="^MoE: top_k must be <= num_experts"):
        dataclasses.replace(cfg, top_k=9)
    moe = MoE.from_config(MoEConfig(H, I, E, 2), device="meta")
    assert moe.top_k == 2 and moe.routing is RoutingMethod.SOFTMAX_TOPK
    with pytest.raises(AttributeError):
        moe.top_k = 3  # read from moe.config: a new value needs a new layer
    moe.cuda_graph_tokens = 0  # the one run-time knob stays settable


def test_unknown_argument_names_the_accepted_ones():
    with pytest.raises(MoeCommTypeError, match=r"^MoE: arguments must be among \[.*'renormalize'.*\] and dtype, device, ep_group, placement, got renormalise$"):
        MoE(H, I, E, 2, renormalise=True)


def test_public_names():
    import moecomm

    assert moecomm.MoEConfig is MoEConfig and callable(moecomm.unpatch_hf_model)


def test_from_config_needs_a_config():
    with pytest.raises(MoeCommTypeError, match="^MoE.from_config: config must be a moecomm.layer.MoEConfig, got dict"):
        MoE.from_config({"hidden_size": H})


@pytest.mark.parametrize("n_group, topk_group, top_k, words", [
    (3, None, 2, "n_group must divide num_experts (8), got 3"),
    (2, 3, 2, "topk_group must be <= n_group (2), got 3"),
    (4, 2, 5, "top_k must be <= topk_group * (num_experts // n_group) = 4 (the experts of the kept groups), got 5"),
    (0, None, 2, "n_group must be >= 1, got 0"),
])
def test_group_rules_are_one_definition(n_group, topk_group, top_k, words):
    """route() and the layer's config apply the same rules with the same words (routing/groups.py)."""
    with pytest.raises(MoeCommValueError) as layer:
        MoEConfig(H, I, E, top_k, routing=SIG, n_group=n_group, topk_group=topk_group)
    with pytest.raises(MoeCommValueError) as op:
        route(torch.randn(4, E), top_k, method=SIG, n_group=n_group, topk_group=topk_group)
    assert str(layer.value) == f"MoE: {words}" and str(op.value) == f"route: {words}"


# ---------------------------------------------------------------- issue 10 point 6: constructor errors
@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.bool, torch.complex64])
def test_unsupported_dtype_is_refused_naming_the_supported_ones(dtype):
    """Before: int32 raised torch's RuntimeError about gradients; float64 built, then route() refused
    the float64 logits without naming the layer's dtype."""
    name = str(dtype).replace("torch.", "")
    with pytest.raises(MoeCommTypeError, match=f"^MoE: dtype must be float32 or bfloat16 or float16, got {name}$"):
        MoE(H, I, E, 2, dtype=dtype)
    with pytest.raises(MoeCommTypeError, match="^MoE: dtype must be"):
        MoE.from_config(MoEConfig(H, I, E, 2), dtype=dtype, device="meta")


def test_float64_default_dtype_is_refused_naming_it():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(MoeCommTypeError, match=r"got float64 \(torch's default dtype, as dtype=None\)"):
            MoE(H, I, E, 2)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_supported_dtypes_build(dtype):
    moe = MoE(H, I, E, 2, dtype=dtype, device="meta")
    assert moe.w_gate_up.dtype == dtype and moe.gate.weight.dtype == dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_device_without_a_gpu_says_what_was_found(device):
    """Before: torch's AssertionError ('Torch not compiled with CUDA enabled') from inside nn.Linear."""
    with pytest.raises(UnsupportedHardwareError, match="^MoE: device must be one this machine has, got .*cuda.*: no CUDA GPU is visible") as info:
        MoE(H, I, E, 2, device=device)
    assert "use device='cpu'" in str(info.value)


def test_bad_device_name_names_the_argument():
    with pytest.raises(MoeCommValueError, match="^MoE: device must be a torch.device or a name like 'cpu', .*got 'gpu0'"):
        MoE(H, I, E, 2, device="gpu0")
    with pytest.raises(MoeCommValueError, match="^MoE: device must be a torch.device"):
        MoE(H, I, E, 2, device=3.5)

"""Patched models under what transformers' own model tests do to them (benchmarks/hf_model_suite.py): its
tensor / expert parallelism wrapping the gate's and the experts' forward, as fast CPU tests of ours on the
tiny configs of tests/hf/test_hf.py (the DeepSeek-V3 test config is tests/hf/test_lifecycle.py's).

# B = batch, S = sequence, H = hidden (64), E = experts (8), k = top_k (2)

Tolerance: the patched model sums the same fp32 products in another order than transformers' eager
experts: 1e-5 relative to the largest logit (as tests/hf/test_lifecycle.py).
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

import moecomm
from moecomm.layer.hf import HFMoE

transformers = pytest.importorskip("transformers")
from test_hf import _model  # noqa: E402  (tests/hf is on sys.path under pytest's rootdir conftest)


def _ids(seed=0, shape=(2, 9)):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def _wrap_forward(module: torch.nn.Module, scale: float) -> None:
    """What transformers' TP/EP styles do (ParallelStyle.install_forward): replace module.forward on the
    instance by one that transforms the output: here a scale, standing in for the all-reduce of the experts'
    partial sums, or of a router's (logits, top_k_weights, top_k_index) the weights (the EP router's remap)."""
    original = module.forward

    def tp_forward(*args, **kwargs):
        out = original(*args, **kwargs)
        return tuple(o * scale if i == 1 else o for i, o in enumerate(out)) if isinstance(out, tuple) else out * scale

    module.forward = tp_forward


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
@pytest.mark.parametrize("where", ["experts", "gate"])
@torch.no_grad()
def test_module_wrapped_by_transformers_parallelism_runs_through_the_wrap(family, where):
    """A model patched right after construction and then distributed by from_pretrained(distributed_config=...)
    (transformers' test_tp_* / test_ep_*) has mlp.experts.forward (moe_tp_experts) and mlp.gate.forward
    (ep_router) wrapped. The patched layer runs the block through those wraps, as transformers does."""
    ref = _model(family)
    plain = copy.deepcopy(ref)
    pat = copy.deepcopy(ref)
    assert moecomm.patch_hf_model(pat) >= 1
    for model in (ref, pat):
        for name, mod in model.named_modules():
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else None
            if name.endswith(f"mlp.{where}") and hasattr(parent, "experts") and hasattr(parent, "gate"):
                _wrap_forward(mod, 3.0)
    layers = [m for m in pat.modules() if isinstance(m, HFMoE)]
    assert layers and all(m.parallel_by_transformers() for m in layers)
    ids = _ids()
    want, got = ref(ids).logits, pat(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    assert not torch.allclose(plain(ids).logits, want, atol=1e-3)  # the wrap changes the output


def test_layer_not_wrapped_runs_moecomm():
    """Without transformers' parallelism the patched layer keeps running moecomm's forward."""
    _, pat = _model("olmoe"), _model("olmoe")
    moecomm.patch_hf_model(pat)
    layers = [m for m in pat.modules() if isinstance(m, HFMoE)]
    assert layers and not any(m.parallel_by_transformers() for m in layers)
    assert all(m.runs_moecomm() for m in layers)


def test_dtensor_experts_weights_run_the_block():
    """Sharded experts weights (DTensor, as tp_plan / ep_plan leave them) are not the whole block's weights:
    the block's own forward runs. Checked through the type's name, as the layer does (no process group here)."""
    pat = _model("olmoe")
    moecomm.patch_hf_model(pat)
    layer = next(m for m in pat.modules() if isinstance(m, HFMoE))
    fake = types.new_class("DTensor", (torch.nn.Parameter,))
    layer.experts.gate_up_proj = fake(layer.experts.gate_up_proj.data)
    assert layer.parallel_by_transformers() and not layer.runs_moecomm()

"""from_pretrained(..., device_map=...) with patched models (issue 11): transformers hands device_map to
accelerate (it refuses device_map without it), which places (and for "disk" offloads, with hooks that
load each decoder layer's weights for its forward) the modules by name.

# B = batch (2), S = sequence (9), V = vocab (128)

Tiny random Mixtral / Qwen3-MoE of tests/hf/test_hf.py, CPU, fp32. Two ways a patched model meets
device_map: a patched model's checkpoint loaded with device_map then patched (load), and a model
patched inside from_pretrained right after construction, on the meta device, before its weights are
placed (construct; what benchmarks/hf_model_suite.py's construct mode does). Weights are compared
exactly; logits bit-exactly against a patched in-memory model (same kernels, same order) and within
1e-5 of the unpatched model's largest logit (fp32 sums in another order: eps 1.2e-7 x depth ~64 x 2
layers, with margin); greedy tokens exactly.

The .half() / .bfloat16() / .to(dtype) moves after patching are in test_lifecycle.py.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import moecomm

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' device_map needs it; moecomm never imports it
from test_hf import _model  # noqa: E402  (tests/hf is on sys.path under pytest's rootdir conftest)

FAMILIES = ["mixtral", "qwen3_moe"]
# every top-level module on the CPU but decoder layer 1, offloaded to disk (accelerate's hooks load it)
_OFFLOAD = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
DEVICE_MAPS = {"cpu": "cpu", "auto": "auto", "dict": {"": "cpu"}, "disk": _OFFLOAD}


def _ids():
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (unpatched model, patched model, folder of the patched model's checkpoint)."""
    out = {}
    for family in FAMILIES:
        ref = _model(family)
        pat = copy.deepcopy(ref)
        assert moecomm.patch_hf_model(pat) == 2
        with torch.no_grad():  # a "fine-tuned" expert: the checkpoint is not the init
            pat.model.layers[1].mlp.w_gate_up.add_(0.01)
            ref.model.layers[1].mlp.experts.gate_up_proj.add_(0.01)
        folder = tmp_path_factory.mktemp(family)
        pat.save_pretrained(folder)
        out[family] = (ref, pat, folder)
    return out


@pytest.fixture
def patch_on_construction(monkeypatch):
    """PreTrainedModel.post_init patches the model it builds (from_pretrained builds on meta)."""
    post_init = transformers.PreTrainedModel.post_init

    @functools.wraps(post_init)
    def patched_post_init(self, *args, **kwargs):
        out = post_init(self, *args, **kwargs)
        moecomm.patch_hf_model(self)
        return out

    monkeypatch.setattr(transformers.PreTrainedModel, "post_init", patched_post_init)


def _check(model, ref, pat, offloaded):
    """Weights bit-identical to the patched model's (offloaded ones live on meta, behind the hooks);
    logits bit-equal to the patched model's, close to the unpatched model's; greedy tokens equal."""
    moe = model.model.layers[0].mlp
    assert isinstance(moe, moecomm.MoE) and moe.w_gate_up is moe.experts.gate_up_proj
    want, got = pat.state_dict(), model.state_dict()
    assert list(got) == list(want)
    for k in want:
        if offloaded and got[k].is_meta:
            assert k.startswith("model.layers.1."), k
            continue
        assert torch.equal(got[k], want[k]), k
    ids = _ids()
    with torch.no_grad():
        logits, want_logits, ref_logits = model(ids).logits, pat(ids).logits, ref(ids).logits
    assert torch.equal(logits, want_logits)
    assert (logits - ref_logits).abs().max().item() <= 1e-5 * ref_logits.abs().max().item()
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **gen), ref.generate(ids, **gen))


@pytest.mark.parametrize("where", list(DEVICE_MAPS))
@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_with_device_map_then_patch(family, where, saved, tmp_path):
    ref, pat, folder = saved[family]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, device_map=DEVICE_MAPS[where], offload_folder=tmp_path).eval()
    assert moecomm.patch_hf_model(model) == 2
    _check(model, ref, pat, offloaded=where == "disk")


@pytest.mark.parametrize("where", list(DEVICE_MAPS))
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_on_meta_inside_from_pretrained_with_device_map(family, where, saved, tmp_path,
                                                               patch_on_construction):
    ref, pat, folder = saved[family]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, device_map=DEVICE_MAPS[where], offload_folder=tmp_path).eval()
    assert moecomm.patch_hf_model(model) == 0  # already patched, on meta, before the weights came
    _check(model, ref, pat, offloaded=where == "disk")

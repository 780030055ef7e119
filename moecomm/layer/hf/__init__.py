"""Hugging Face transformers integration: MoE blocks replaced by moecomm.MoE, in the blocks' own layout.

transformers' own model tests on patched models (benchmarks/hf_model_suite.py; issue 11's bar): the
per-model test files of Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE and DeepSeek-V3 with transformers 5.17.0's
ModelTesterMixin (and its tensor/expert-parallel mixin, 2 gloo ranks), models patched right after
construction or after from_pretrained: no test that passes unpatched fails patched. No test of these files
inspects the replaced block's class or submodules by name in a way the patched layer breaks (it keeps the
block's submodules under their names: gate, experts, shared_expert(s)), so none is excepted.

Tests failing in both modes (not ours; transformers 5.17 / torch 2.13 on CPU, or the copies of the
per-model files being of another transformers version):
- test_eager_matches_batched_and_grouped_inference (fp16 / bf16; Mixtral fp32 too): the test selects
  transformers' grouped_mm, and torch's CPU grouped_mm refuses rows that are not a multiple of 16 bytes
  (moe intermediate 37 or 12); a patched model runs transformers' block under an implementation chosen
  after patching, so fails the same way. With transformers' default (grouped_mm) every forward of those
  two families fails so unpatched; patched models pass them (hf_model_suite --default-experts eager
  gives the baseline where both pass).
- Mixtral test_load_balancing_loss: the test file expects an aux loss of 8 (an older definition);
  transformers 5.17 gives 2.0052 on that input, and the patched model the same.
- Mixtral test_model_rope_scaling_*: MixtralConfig.head_dim is None unless given, and 5.17's RoPE
  init multiplies it.
- Qwen2-MoE test_num_layers_is_small: that file's tester has 5 layers, 5.17's mixin asks for <= 2.

Generation tests (GenerationTesterMixin: greedy / sample / beam, dict outputs, caches, static cache and
compile, inputs_embeds, left padding, assisted and prompt-lookup decoding; 37 per family, transcribed from a
5.x tests/generation/test_utils.py), pass / fail / skip, --default-experts eager | transformers' default:

    family        unpatched              construct              load
    mixtral       26/9/2  |  5/30/2      27/8/2  | 27/8/2       26/9/2  |  7/28/2
    qwen3_moe     32/4/1  | 30/6/1       33/3/1  | 33/3/1       32/4/1  | 32/4/1
    qwen2_moe     30/4/3  | 28/6/3       31/3/3  | 31/3/3       30/4/3  | 30/4/3
    olmoe         31/4/2  | 32/3/2       32/3/2  | 32/3/2       31/4/2  | 32/3/2
    deepseek_v3   26/10/1 | 27/9/1       27/9/1  | 27/9/1       26/10/1 | 27/9/1

No test that passes unpatched fails patched. The generation tests build models directly, so load mode
patches only the few that go through from_pretrained (2 to 10 blocks a family): construct is the patched
run. Failing in every mode (not ours):
- assisted decoding (3 tests) asks for cache_implementation "dynamic_full", which 5.17 does not have. With
  that key dropped, they and prompt lookup pass on Qwen3-MoE, Qwen2-MoE and OLMoE, patched as unpatched;
  on Mixtral and DeepSeek-V3 they fail only at the cache-shape check (next item), after matching greedy.
- the cache-shape checks: Mixtral's read config.head_dim (None in 5.17); DeepSeek-V3's expect
  num_key_value_heads (4) heads where its cache has 1 (the real per-model file overrides the check).
- transformers' default experts (grouped_mm): its 16-byte rows, as above (Mixtral, and static-cache tests).
test_generate_compile_model_forward_fullgraph fails unpatched with eager experts (data-dependent shapes
under fullgraph=True, dynamic=False) and passes patched.

device_map: from_pretrained(..., device_map="cpu" | "auto" | {"": "cpu"} | layers offloaded to disk) works on
a patched model's checkpoint, patched after loading or on meta inside from_pretrained (tests/hf/test_device_map.py).
"""

from .blocks import BLOCKS, SUPPORTED_BLOCKS
from .convert import from_hf, patch_hf_model, unpatch_hf_model
from .patched import HFMoE

__all__ = ["BLOCKS", "HFMoE", "SUPPORTED_BLOCKS", "from_hf", "patch_hf_model", "unpatch_hf_model"]
